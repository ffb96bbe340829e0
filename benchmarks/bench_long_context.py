"""Long context on CPU: step time and peak memory per rank with context parallelism (CP 1, 2, 4).

    python benchmarks/bench_long_context.py --seqs 8192 16384 32768 --cps 1 2 4 --write-doc docs/benchmarks.md

A tiny Llama-style model (2 layers, hidden 64, 4 heads / 2 query groups of dim 16, SwiGLU FFN 128,
vocabulary 512, RoPE, fp32) trains on one sequence of ``seq`` tokens per step. For each (seq, CP),
CP fresh processes (gloo, one torch thread each) build megafast's GPTModel under a ParallelState with
``--context-parallel-size CP`` (ring attention, ``--cp-comm-type p2p``; ``--comm a2a`` for
all-to-all), feed each rank its load-balanced chunks (megafast.parallel.context_parallel), and run
forward + backward + the gradient all-reduce over the CP group + an SGD step. Reported per
configuration: the step time (slowest rank, median of ``--timed-steps`` after ``--warmup-steps``),
the peak memory per rank (the largest rise of the process's peak RSS over its RSS before the timed
steps (after the warm-up, if any), over the ranks; glibc is told to return freed memory at once so
that RSS follows the live tensors) and the planner's activation bytes for that rank (megafast.planner).

CP ranks share the machine's cores, so on a 2-core CPU CP=4 runs 4 processes on 2 cores: the step
time shows the attention work per rank only where cores are free (a GPU per rank is the real
setting); the memory per rank is what context parallelism is for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from doc_section import write_section  # noqa: E402

from megafast.config import GPTConfig, ParallelConfig  # noqa: E402

SECTION = "bench_long_context"


def model_config(seq: int) -> GPTConfig:
    return GPTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     ffn_hidden_size=128, vocab_size=512, max_position_embeddings=seq, position_embedding_type="rope",
                     normalization="RMSNorm", activation="swiglu", add_bias_linear=False, tie_embeddings=False,
                     attention_dropout=0.0, hidden_dropout=0.0, make_vocab_size_divisible_by=1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world: int, init: str, seq: int, comm: str, warmup: int, timed: int, queue) -> None:
    from megafast.model import GPTModel
    from megafast.parallel.context_parallel import slice_sequence
    from megafast.parallel.state import ParallelState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    state = ParallelState.create(ParallelConfig(context_parallel_size=world, cp_comm_type=comm))
    config = model_config(seq)
    model = GPTModel(config, state, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq + 1), generator=g)
    tokens, labels = slice_sequence(ids[:, :-1], world, rank), slice_sequence(ids[:, 1:], world, rank)
    positions = slice_sequence(torch.arange(seq)[None], world, rank)
    times = []
    base = _rss_bytes()
    for step in range(warmup + timed):
        if step == warmup and warmup:  # after a warm-up: lazy imports and one-off buffers are not counted
            base = _rss_bytes()
        dist.barrier()
        start = time.perf_counter()
        loss = model(tokens, position_ids=positions, labels=labels).sum() / seq
        loss.backward()
        for p in model.parameters():
            if world > 1:
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= warmup:
            times.append(elapsed.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put((rank, statistics.median(times), peak))
    dist.destroy_process_group()


def run(seq: int, cp: int, comm: str, warmup: int, timed: int) -> dict:
    # glibc returns freed blocks to the OS at once, so that a rank's RSS follows its live tensors
    os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, cp, init, seq, comm, warmup, timed, queue)) for r in range(cp)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=3600) for _ in range(cp)]
        for p in procs:
            p.join()
    from megafast.planner import Layout, Stage, chunk_activation_bytes

    layout = Layout(seq_length=seq, dtype="fp32", cp=cp, cp_comm_type=comm)
    predicted = chunk_activation_bytes(model_config(seq), layout, Stage((0, 2), True, True), "cpu")
    return {"seq": seq, "cp": cp, "comm": comm, "step_s": max(r[1] for r in results),
            "peak_rss_rise_mb": max(r[2] for r in results) / 2**20, "planner_activations_mb": predicted / 2**20}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Long context on CPU: context parallelism, step time and memory per rank",
        "",
        f"- date: {when}; machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU; one torch thread "
        f"per rank; {args.note}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
        "- model: 2 layers, hidden 64, 4 heads / 2 query groups (head dim 16), SwiGLU FFN 128, vocabulary 512, "
        "RoPE, fp32; one sequence per step; forward + backward + CP gradient all-reduce + SGD",
        f"- CP exchange: {args.comm} ({'ring attention, torch blocks' if args.comm == 'p2p' else 'all-to-all'}); "
        f"step time: slowest rank, median of {args.timed_steps} steps after {args.warmup_steps} warm-up",
        "- memory: the largest rise of a rank's peak RSS over its RSS before the timed steps; planner: "
        "the activation bytes megafast.planner predicts for one rank",
        f"- command: `python benchmarks/bench_long_context.py --seqs {' '.join(map(str, args.seqs))} --cps "
        f"{' '.join(map(str, args.cps))} --write-doc docs/benchmarks.md`",
        "",
        "| seq | CP | step s | peak memory per rank MB | planner activations per rank MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seq']:,} | {r['cp']} | {r['step_s']:.2f} | {r['peak_rss_rise_mb']:,.0f} | "
                     f"{r['planner_activations_mb']:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--comm", choices=["p2p", "a2a"], default="p2p")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--timed-steps", type=int, default=2)
    p.add_argument("--note", default="", help="a remark for the doc (e.g. the machine was shared)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--write-doc", default=None, help="docs/benchmarks.md: replace this benchmark's section")
    args = p.parse_args(argv)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for seq in args.seqs:
        for cp in args.cps:
            row = run(seq, cp, args.comm, args.warmup_steps, args.timed_steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(args.out, "bench_long_context.json"), "w") as f:  # partial results survive
                json.dump(rows, f, indent=1)
    text = table(rows, args)
    print(text)
    if args.write_doc:
        write_section(args.write_doc, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
