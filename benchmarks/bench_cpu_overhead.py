"""The framework tax on CPU: pretrain_gpt.py's trainer vs a plain transformers loop, side by side.

    python benchmarks/bench_cpu_overhead.py --rounds 5 --write-doc docs/benchmarks.md

Both sides train the same small Llama in the same process, fp32 on the CPU with
``torch.set_num_threads(--threads)`` (default 2): 4 layers, hidden 256, SwiGLU FFN 688, 8 heads / 4
query groups, vocabulary 8000 (``--make-vocab-size-divisible-by 1``: no padded rows, the same
output layer as the baseline), untied embeddings, seq 256, micro-batch 4 = global batch 4.

1. megafast: ``trainer.setup`` + ``trainer.train`` at (TP, PP, DP) = (1, 1, 1), as
   ``python pretrain_gpt.py --mock-data ...`` runs them (gloo world of one, the pipeline engine at
   PP=1, the DP gradient buffers, the mixed-precision optimizer, the sampler and batch prefetcher,
   the logger); per-iteration times from its ``--log-jsonl`` (``--log-interval 1``).
2. baseline: ``transformers.LlamaForCausalLM`` (``attn_implementation="sdpa"``) with megafast's
   initial weights, ``F.cross_entropy``, ``torch.optim.AdamW``, ``clip_grad_norm_``: the loop of
   benchmarks/bench_train.py (whose set-up, timing and weight transfer this script reuses).

Each round runs both sides (``--warmup-iters`` untimed, then ``--timed-iters`` timed iterations),
megafast first in even rounds and the baseline first in odd ones, so a slow spell of a shared
machine hits both. Reported: per side the median over rounds of the round's tokens/s (a round's
tokens/s = tokens per step / mean timed step time) and the best round; the ratio megafast /
baseline of each round and their median (the figure to read). Results go to
``--out/bench_cpu_overhead.json``; ``--write-doc`` puts the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402 - benchmarks/ is not a package
from doc_section import write_section  # noqa: E402

SECTION = "bench_cpu_overhead"
SHAPE = [  # bench_train flags of the model and batch shape of issue 12, section 4
    "--num-layers", "4", "--hidden-size", "256", "--ffn-hidden-size", "688", "--num-attention-heads", "8",
    "--num-query-groups", "4", "--vocab-size", "8000", "--rotary-base", "10000", "--untie-embeddings",
    "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "4",
    "--device", "cpu", "--dtype", "fp32", "--label", "CPU overhead model",
    "--megafast-args", "--make-vocab-size-divisible-by 1",
]


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of both sides")
    p.add_argument("--warmup-iters", type=int, default=3)
    p.add_argument("--timed-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="step times in wall seconds (default), or in CPU seconds of the process (all its "
                        "threads; less sensitive to other jobs on a shared machine, run it with "
                        "OMP_WAIT_POLICY=PASSIVE so that waiting threads do not spin)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_results")
    p.add_argument("--write-doc", default=None, help="put the section into this markdown file")
    p.add_argument("--note", default="", help="a line added under the table")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.timed_iters < 1 or a.warmup_iters < 0:
        p.error("need --rounds >= 1, --timed-iters >= 1 and --warmup-iters >= 0")
    return a


class _Clock:
    """Stands in for the ``time`` module of the timing code of both sides (bench_train's baseline
    loop, the trainer's Timer): ``perf_counter`` is ``clock``, the rest is the real module."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.perf_counter = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def step_clock(kind: str) -> Iterator[None]:
    """Within: both sides time their steps with ``kind`` ('wall': time.perf_counter, 'cpu':
    time.process_time, CPU seconds of every thread of this process)."""
    from megafast.training import logging as training_logging

    if kind == "wall":
        yield
        return
    modules = (bench_train, training_logging)
    saved = [m.time for m in modules]
    for m in modules:
        m.time = _Clock(time.process_time)
    try:
        yield
    finally:
        for m, t in zip(modules, saved):
            m.time = t


def run_round(setup: bench_train.BenchSetup, megafast_first: bool) -> dict[str, dict]:
    """Both sides once; the baseline starts from the weights megafast initialised."""
    out: dict[str, dict] = {}
    weights = None
    for side in ("megafast", "hf") if megafast_first else ("hf", "megafast"):
        bench_train.free_device_memory(setup.device)
        if side == "megafast":
            out[side], weights = bench_train.run_megafast(setup)
        else:  # hf first: initialise megafast's weights without training (same seed, same weights)
            out[side] = bench_train.run_hf(setup, weights if weights is not None else initial_weights(setup))
        if out[side].get("error"):
            raise SystemExit(f"error: the {side} side failed: {out[side]['error']}")
    return out


def initial_weights(setup: bench_train.BenchSetup) -> dict[str, torch.Tensor]:
    """megafast's initial weights of the run (what trainer.setup draws from the seed)."""
    import torch.distributed as dist

    from megafast.training import trainer

    run = trainer.setup(list(setup.megafast_argv))
    try:
        return {n: p.detach().clone() for n, p in run.chunks[0].named_parameters()}
    finally:
        run.logger.close()
        del run
        if dist.is_initialized():
            dist.destroy_process_group()


def summarize(rounds: list[dict[str, dict]]) -> dict[str, Any]:
    per_side = {}
    for side in ("megafast", "hf"):
        tps = [r[side]["tokens_per_s"] for r in rounds]
        per_side[side] = {"tokens_per_s_rounds": tps, "tokens_per_s_median": statistics.median(tps),
                          "tokens_per_s_best": max(tps),
                          "step_time_s_median": statistics.median(r[side]["step_time_s"] for r in rounds)}
    ratios = [r["megafast"]["tokens_per_s"] / r["hf"]["tokens_per_s"] for r in rounds]
    loss_diff = max(abs(m - h) / abs(h) for r in rounds
                    for m, h in zip(r["megafast"]["losses"], r["hf"]["losses"]))
    return {"sides": per_side, "ratio_rounds": ratios, "ratio_median": statistics.median(ratios),
            "ratio_of_best": per_side["megafast"]["tokens_per_s_best"] / per_side["hf"]["tokens_per_s_best"],
            "loss_max_rel_diff": loss_diff}


def render_markdown(results: dict) -> str:
    env, cfg, s = results["environment"], results["config"], results["summary"]
    m, h = s["sides"]["megafast"], s["sides"]["hf"]
    rounds = len(s["ratio_rounds"])
    lines = [
        "## CPU framework tax: pretrain_gpt.py vs a plain transformers loop (same run)",
        "",
        f"- date: {env['date']}; machine: {env['device']}; torch.set_num_threads({env['threads']})",
        f"- versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        (f"- model: Llama-style, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
         f"{cfg['num_attention_heads']} heads / {cfg['num_query_groups']} query groups, SwiGLU FFN "
         f"{cfg['ffn_hidden_size']}, vocabulary {cfg['vocab_size']} (unpadded), untied embeddings, fp32; seq "
         f"{cfg['seq_length']}, micro-batch {cfg['micro_batch_size']}, global batch {cfg['global_batch_size']}"),
        ("- megafast: pretrain_gpt.py's trainer at (TP, PP, DP) = (1, 1, 1), --mock-data, gloo; baseline: "
         "LlamaForCausalLM (sdpa), F.cross_entropy, torch.optim.AdamW, clip_grad_norm_, megafast's initial "
         f"weights (largest relative loss difference over all iterations: {s['loss_max_rel_diff']:.1e})"),
        (f"- timing: {rounds} alternating rounds, each {cfg['warmup_iters']} warm-up + {cfg['timed_iters']} "
         "timed iterations per side; a round's tokens/s from its mean timed step time, "
         + ("wall time" if env.get("clock", "wall") == "wall" else
            "in CPU seconds of the process (tokens per CPU-second, all threads; OMP_WAIT_POLICY="
            f"{env.get('omp_wait_policy')})")),
        f"- command: `{env['command']}`",
        "",
        "| | tokens/s (median of rounds) | best round | step ms (median) |",
        "|---|---:|---:|---:|",
        (f"| megafast pretrain_gpt.py | {m['tokens_per_s_median']:,.0f} | {m['tokens_per_s_best']:,.0f} | "
         f"{1000 * m['step_time_s_median']:.1f} |"),
        (f"| transformers LlamaForCausalLM | {h['tokens_per_s_median']:,.0f} | {h['tokens_per_s_best']:,.0f} | "
         f"{1000 * h['step_time_s_median']:.1f} |"),
        (f"| megafast / transformers | {s['ratio_median']:.3f}x (median of the rounds' ratios) | "
         f"{s['ratio_of_best']:.3f}x | |"),
        "",
        "Ratio of each round: " + ", ".join(f"{r:.3f}" for r in s["ratio_rounds"]) + ".",
    ]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def _command(argv: list[str]) -> str:
    """The command line for the doc, without the note and the output folder."""
    kept, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--note", "--out"):
            skip = True
        elif not x.startswith(("--note=", "--out=")):
            kept.append(x)
    return "python benchmarks/bench_cpu_overhead.py " + " ".join(kept)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    ba = bench_train.parse([*SHAPE, "--warmup-iters", str(a.warmup_iters), "--timed-iters", str(a.timed_iters),
                            "--out", a.out])
    setup = bench_train.build_setup(ba)
    env = bench_train.environment(setup)
    env.update(threads=torch.get_num_threads(),
               date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               device=f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU", clock=a.clock,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               command=_command(sys.argv[1:] if argv is None else argv))
    rounds = []
    for r in range(a.rounds):
        with step_clock(a.clock):
            rounds.append(run_round(setup, megafast_first=r % 2 == 0))
        print(f"round {r + 1}/{a.rounds}: megafast {rounds[-1]['megafast']['tokens_per_s']:,.0f} tokens/s, "
              f"transformers {rounds[-1]['hf']['tokens_per_s']:,.0f} tokens/s", flush=True)
    results = {"environment": env, "config": bench_train.config_record(setup, "CPU overhead model"),
               "summary": summarize(rounds), "rounds": rounds, "note": a.note}
    with open(os.path.join(a.out, "bench_cpu_overhead.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    text = render_markdown(results)
    print(text)
    if a.write_doc:
        write_section(a.write_doc, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
