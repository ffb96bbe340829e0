"""Random seeds for tests, reported on failure and replayable.

    seed = draw_seed("seed")          # fresh from the OS each run (or replayed, see below)
    data_seed = draw_seed("data_seed")

Every seed drawn while a test (or one of the fixtures it uses, module-scoped ones included) is set
up or run is printed with that test's failure, as ``random seeds: seed=123 data_seed=456``, with the
line that replays them: ``MEGAFAST_TEST_SEEDS="seed=123,data_seed=456" pytest ...`` makes
``draw_seed(name)`` return the given value for each name listed (conftest.py does the reporting).
"""

from __future__ import annotations

import os
import random

import torch

ENV = "MEGAFAST_TEST_SEEDS"
_drawn: list[tuple[str, int]] = []  # every seed drawn in this process, in order (conftest slices it)


def _replayed() -> dict[str, int]:
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return {}
    try:
        return {k.strip(): int(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item.strip())}
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: write it as name=int,name=int (as printed with a failure)") from None


def draw_seed(name: str = "seed") -> int:
    """A seed in [0, 2**30): from $MEGAFAST_TEST_SEEDS when it names ``name``, else from the OS."""
    seed = _replayed().get(name)
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 30)
    _drawn.append((name, seed))
    return seed


def seed_torch(name: str = "seed") -> int:
    """``torch.manual_seed(draw_seed(name))``; returns the seed (for torch's default generator)."""
    seed = draw_seed(name)
    torch.manual_seed(seed)
    return seed


def mark() -> int:
    """A position in the record of drawn seeds (see :func:`since`)."""
    return len(_drawn)


def since(position: int) -> list[tuple[str, int]]:
    """The seeds drawn after ``mark()`` returned ``position``."""
    return list(_drawn[position:])


def describe(seeds: list[tuple[str, int]]) -> str:
    """``seed=1 data_seed=2`` plus the line that replays them."""
    pairs = ",".join(f"{n}={s}" for n, s in seeds)
    return f"random seeds: {' '.join(f'{n}={s}' for n, s in seeds)}\nreplay with: {ENV}=\"{pairs}\" pytest ..."
