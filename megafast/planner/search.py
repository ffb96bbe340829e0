"""The layout search: every (TP, PP, DP, EP, micro-batch, recompute, DP sharding strategy) layout of a
cluster estimated (:func:`~megafast.planner.throughput.estimate`; EP for MoE models: every divisor
of DP that divides the expert count), the ones that fit ranked by
tokens/s, the others kept with the reason they do not fit. A layout that does not fit is tried
once more with the optimizer offloaded to the CPU (``--optimizer-cpu-offload``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

from megafast.config import GPTConfig
from megafast.planner.layout import SHARDING_STRATEGIES, Layout
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
    sharding_strategies: Optional[Iterable[str]] = None,
    offload: bool = True,
    sequence_parallel: Optional[bool] = None,
    layers_per_virtual_stage: Optional[int] = None,
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    ep: Optional[int] = None,
    moe_token_dispatcher_type: str = "alltoall",
) -> Plan:
    """Estimate every (TP, PP, DP, micro-batch, recompute, distributed optimizer) layout of
    ``cluster.num_gpus`` GPUs; rank the ones that fit by tokens/s.

    ``tp``/``pp`` fix those sizes (else every divisor of the GPU count is tried);
    ``sequence_parallel`` None turns it on whenever TP > 1 (it saves memory at equal traffic);
    ``recompute_method``/``recompute_num_layers`` apply to the full-recompute layouts.
    ``sharding_strategies`` (default: no_shard when ``distributed_optimizer`` holds False, the three
    sharded ones when it holds True); ``offload``: retry a layout that does not fit with the
    optimizer offloaded to the CPU. ``ep`` fixes the expert-parallel size of an MoE model (else
    every divisor of DP that divides the expert count is tried), with ``moe_token_dispatcher_type``.
    """
    flags = set(distributed_optimizer)
    strategies = list(sharding_strategies) if sharding_strategies is not None else (
        (["no_shard"] if False in flags else []) + (list(SHARDING_STRATEGIES[1:]) if True in flags else []))
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
                eps = [1] if not config.is_moe else [ep] if ep else [
                    x for x in _divisors(d) if config.num_experts % x == 0]
                for rc in recompute:
                    for strategy in strategies:
                        for x in eps:
                            if strategy != "no_shard" and d == 1:
                                continue  # identical to the plain optimizer
                            layout = Layout(
                                ep=x,
                                moe_token_dispatcher_type=moe_token_dispatcher_type,
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
                                sharding_strategy=strategy,
                                **sizes,
                            )
                            est = estimate(config, layout, cluster)
                            if not est.fits and offload and est.memory is not None:
                                offloaded = estimate(config, replace(layout, optimizer_offload_fraction=1.0), cluster)
                                if offloaded.fits:
                                    rejected.append(est)
                                    est = offloaded
                            (feasible if est.fits else rejected).append(est)
    feasible.sort(key=lambda x: (-x.tokens_per_s, x.memory.total))
    return Plan(feasible, rejected)


STRATEGY_NAMES = {
    "no_shard": "no_shard (DDP)",
    "optim": "optim (ZeRO-1)",
    "optim_grads": "optim_grads (ZeRO-2)",
    "optim_grads_params": "optim_grads_params (ZeRO-3)",
}


def describe(layout: Layout) -> str:
    """A layout in one phrase, with its sharding strategy and offload."""
    off = f" + optimizer CPU offload {layout.optimizer_offload_fraction:g}" if layout.optimizer_offload_fraction else ""
    ep = f" (EP {layout.ep}, {layout.moe_token_dispatcher_type})" if layout.ep > 1 else ""
    return (f"TP {layout.tp} x PP {layout.pp} x DP {layout.dp}{ep}, micro-batch {layout.micro_batch_size}, "
            f"recompute {layout.recompute or 'none'}, {STRATEGY_NAMES[layout.sharding_strategy]}{off}")


def explain(plan: Plan, usable_gb: float) -> list[str]:
    """Why the first layout of ``plan`` was chosen: against the same layout under the other
    sharding strategies (too big, slower, or as fast but bigger), with or without offload, and
    against the runner-up."""
    if not plan.feasible:
        return ["no layout fits: see the rejected layouts (the smallest first)"]
    best = plan.feasible[0]
    lay = best.layout
    lines = [f"chosen: {describe(lay)}: {best.tokens_per_s:,.0f} tokens/s, {best.memory.total / 1e9:.1f} GB "
             f"of {usable_gb:.1f} GB usable (the fastest layout that fits; ties go to less memory)"]
    same = lambda e: (e.layout.tp, e.layout.pp, e.layout.dp, e.layout.micro_batch_size, e.layout.recompute,  # noqa: E731
                      e.layout.num_model_chunks, e.layout.ep) == (lay.tp, lay.pp, lay.dp, lay.micro_batch_size,
                                                                  lay.recompute, lay.num_model_chunks, lay.ep)
    for est in plan.feasible[1:] + plan.rejected:
        other = est.layout
        if not same(est) or est.memory is None or (other.sharding_strategy, other.optimizer_offload_fraction) == (
                lay.sharding_strategy, lay.optimizer_offload_fraction):
            continue
        name = STRATEGY_NAMES[other.sharding_strategy] + (" + offload" if other.optimizer_offload_fraction else "")
        gb = est.memory.total / 1e9
        if not est.fits:
            lines.append(f"  {name}: needs {gb:.1f} GB > {usable_gb:.1f} GB usable")
        elif est.tokens_per_s < best.tokens_per_s * 0.9995:
            dp = est.time.dp_comm + est.time.optimizer - best.time.dp_comm - best.time.optimizer
            lines.append(f"  {name}: fits ({gb:.1f} GB) but {1 - est.tokens_per_s / best.tokens_per_s:.1%} slower "
                         f"({dp:+.3f} s/step of exposed DP communication and optimizer step)")
        else:
            lines.append(f"  {name}: as fast, but {gb:.1f} GB against {best.memory.total / 1e9:.1f} GB")
    lines += _explain_ep(plan, best, usable_gb)
    if len(plan.feasible) > 1:
        second = plan.feasible[1]
        lines.append(f"runner-up: {describe(second.layout)}: "
                     f"{1 - second.tokens_per_s / best.tokens_per_s:.1%} slower")
    return lines


def _explain_ep(plan: Plan, best, usable_gb: float) -> list[str]:
    """The chosen layout against itself at the other expert-parallel sizes (MoE): memory, the
    dispatcher's time and the step."""
    lay = best.layout
    key = lambda x: (x.tp, x.pp, x.dp, x.micro_batch_size, x.recompute, x.num_model_chunks,  # noqa: E731
                     x.sharding_strategy, x.optimizer_offload_fraction)
    others = sorted((e for e in plan.feasible + plan.rejected
                     if e.memory is not None and e.layout.ep != lay.ep and key(e.layout) == key(lay)),
                    key=lambda e: e.layout.ep)
    lines = []
    for est in others:
        gb, ep = est.memory.total / 1e9, est.layout.ep
        if not est.fits:
            lines.append(f"  EP {ep}: needs {gb:.1f} GB > {usable_gb:.1f} GB usable")
            continue
        lines.append(f"  EP {ep}: {gb:.1f} GB against {best.memory.total / 1e9:.1f} GB, "
                     f"{est.time.ep_comm:.3f} s/step of token dispatch against {best.time.ep_comm:.3f}, "
                     f"{1 - est.tokens_per_s / best.tokens_per_s:+.1%} slower")
    return lines


__all__ = ["Plan", "STRATEGY_NAMES", "describe", "explain", "search"]
