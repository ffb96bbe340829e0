"""Sample-index build speed: megafast._C vs Megatron-core's helpers_cpp, side by side.

    python benchmarks/bench_sample_idx.py [--tokens 1e9] [--seq-length 2048] [--repeats 3]

Makes random document lengths (uniform in [1, 2 * mean]) summing to about `--tokens` tokens
(~500k documents of ~2000 tokens for 1e9), one shuffled epoch of them as the document index, and
times `build_sample_idx` on it: (a) ours through `megafast.data.helpers.build_sample_idx` (the
wrapper a GPTDataset calls), (b) Megatron-core's `helpers.build_sample_idx` when importable, (c)
our NumPy reference (vectorised, for scale). Each runs `--repeats` times, interleaved; the best
time is reported. All results must be equal (the script exits non-zero otherwise). Requirement:
(a) under 1 s for 1e9 tokens at sequence length 2048.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from megafast.data.helpers import build_sample_idx, build_sample_idx_reference  # noqa: E402

REQUIREMENT_S = 1.0


def make_stream(num_tokens: int, mean_length: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(sizes int32[D], document_index int32[D] shuffled, tokens) with sum(sizes) ~ num_tokens."""
    rng = np.random.default_rng(seed)
    num_docs = max(1, num_tokens // mean_length)
    sizes = rng.integers(1, 2 * mean_length, num_docs, dtype=np.int32)
    document_index = np.arange(num_docs, dtype=np.int32)
    np.random.RandomState(seed).shuffle(document_index)
    return sizes, document_index, int(sizes.sum(dtype=np.int64))


def timed(fn: Callable[[], np.ndarray], times: list[float]) -> np.ndarray:
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-doc-length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    args = parser.parse_args()

    sizes, document_index, tokens = make_stream(int(args.tokens), args.mean_doc_length, args.seed)
    call = (sizes, document_index, args.seq_length, 1, tokens, True, True)
    print(
        f"stream: {tokens:,} tokens in {sizes.size:,} documents, seq_length {args.seq_length}, "
        f"{(tokens - 1) // args.seq_length:,} samples"
    )

    variants: dict[str, Callable[[], np.ndarray]] = {"megafast._C": lambda: build_sample_idx(*call)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers as megatron_helpers

        variants["megatron helpers_cpp"] = lambda: megatron_helpers.build_sample_idx(*call)
    except ImportError as err:
        print(f"megatron-core not importable ({err}); timing megafast only")
    if not args.no_reference:
        variants["numpy reference"] = lambda: build_sample_idx_reference(*call, dtype=np.int32)

    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            results[name] = timed(fn, times[name])

    ours = results["megafast._C"]
    equal = all(np.array_equal(ours, r) for r in results.values())
    machine = platform.processor() or platform.machine()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {machine}, {os.cpu_count()} cpus")
    for name in variants:
        runs = ", ".join(f"{t:.4f}" for t in times[name])
        print(f"  {name:22s} best {min(times[name]):8.4f} s   (runs: {runs})")
    if "megatron helpers_cpp" in times:
        ratio = min(times["megatron helpers_cpp"]) / min(times["megafast._C"])
        print(f"  speed-up vs megatron: {ratio:.2f}x")
    print(f"  results equal: {equal}   shape {ours.shape} {ours.dtype}")
    fast_enough = min(times["megafast._C"]) < REQUIREMENT_S
    print(f"  requirement < {REQUIREMENT_S} s: {'met' if fast_enough else 'NOT met'}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
