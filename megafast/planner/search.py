"""The layout search: every (TP, PP, DP, micro-batch, recompute, distributed optimizer) layout of a
cluster estimated (:func:`~megafast.planner.throughput.estimate`), the ones that fit ranked by
tokens/s, the others kept with the reason they do not fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megafast.config import GPTConfig
from megafast.planner.layout import Layout
from megafast.planner.throughput import Cluster, Estimate, estimate


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class Plan:
    feasible: list[Estimate]  # fastest first
    rejected: list[Estimate]


def search(
    config: GPTConfig,
    cluster: Cluster,
    seq_length: int,
    global_batch_size: int,
    *,
    dtype: str = "bf16",
    optimizer: str = "adam",
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    micro_batch_sizes: Sequence[int] = (1, 2, 4, 8),
    recompute: Iterable[Optional[str]] = (None, "selective", "full"),
    distributed_optimizer: Iterable[bool] = (False, True),
    sequence_parallel: Optional[bool] = None,
    layers_per_virtual_stage: Optional[int] = None,
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
) -> Plan:
    """Estimate every (TP, PP, DP, micro-batch, recompute, distributed optimizer) layout of
    ``cluster.num_gpus`` GPUs; rank the ones that fit by tokens/s.

    ``tp``/``pp`` fix those sizes (else every divisor of the GPU count is tried);
    ``sequence_parallel`` None turns it on whenever TP > 1 (it saves memory at equal traffic);
    ``recompute_method``/``recompute_num_layers`` apply to the full-recompute layouts.
    """
    if global_batch_size < 1 or seq_length < 1:
        raise ValueError(
            f"global batch size and sequence length must be >= 1, got {global_batch_size}, {seq_length}"
        )
    feasible, rejected = [], []
    n = cluster.num_gpus
    sizes = dict(seq_length=seq_length, dtype=dtype, optimizer=optimizer)
    for t in [tp] if tp else _divisors(n):
        for p in [pp] if pp else _divisors(n // t) if n % t == 0 else [1]:
            if n % (t * p):
                rejected.append(
                    Estimate.rejected(Layout(tp=t, pp=p, **sizes), f"TP x PP = {t} x {p} does not divide {n} GPUs")
                )
                continue
            d, v = n // (t * p), 1
            if layers_per_virtual_stage and p > 1:
                if config.num_layers % (layers_per_virtual_stage * p):
                    why = (
                        f"{config.num_layers} layers do not split into PP {p} x "
                        f"{layers_per_virtual_stage}-layer chunks"
                    )
                    rejected.append(Estimate.rejected(Layout(tp=t, pp=p, dp=d, **sizes), why))
                    continue
                v = config.num_layers // (layers_per_virtual_stage * p)
            for mbs in micro_batch_sizes:
                if global_batch_size % (mbs * d):
                    why = f"global batch {global_batch_size} is not a multiple of micro-batch {mbs} x DP {d}"
                    rejected.append(Estimate.rejected(Layout(tp=t, pp=p, dp=d, micro_batch_size=mbs, **sizes), why))
                    continue
                for rc in recompute:
                    for dist in distributed_optimizer:
                        if dist and d == 1:
                            continue  # identical to the plain optimizer
                        layout = Layout(
                            tp=t,
                            pp=p,
                            dp=d,
                            micro_batch_size=mbs,
                            num_microbatches=global_batch_size // (mbs * d),
                            num_model_chunks=v,
                            sequence_parallel=(t > 1) if sequence_parallel is None else sequence_parallel,
                            recompute=rc,
                            recompute_method=recompute_method,
                            recompute_num_layers=recompute_num_layers,
                            distributed_optimizer=dist,
                            **sizes,
                        )
                        est = estimate(config, layout, cluster)
                        (feasible if est.fits else rejected).append(est)
    feasible.sort(key=lambda x: (-x.tokens_per_s, x.memory.total))
    return Plan(feasible, rejected)


__all__ = ["Plan", "search"]
