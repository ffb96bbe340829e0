"""Memory and step time per data-parallel sharding strategy, side by side with the planner.

Runs a ~110M-parameter Llama-style model (12 layers, hidden 768, SwiGLU 2048, vocabulary 32000,
tied embeddings) on ``--dp`` gloo ranks on the CPU (or NCCL on GPUs with ``--device cuda``)
under each strategy (no_shard, optim, optim_grads, optim_grads_params, and ZeRO-3 with the
optimizer offloaded), and reports per rank:

- model state after a step: bytes of the allocated parameter, gradient and optimizer tensors
  (each storage once) against megafast.planner.memory.static_memory;
- peak allocated bytes during a step: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
  model state at the start of the step plus the peak of the running sum of the CPU allocator's
  allocations and frees recorded by ``torch.profiler`` (``profile_memory=True``) during the step,
  against the planner's static + activation peak;
- step time: the median of ``--steps`` timed steps after one warm-up (without the profiler).

    python benchmarks/bench_memory.py --dp 4 --write-doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from doc_section import write_section  # noqa: E402
from megafast.config import GPTConfig, ParallelConfig  # noqa: E402
from megafast.parallel import ParallelState  # noqa: E402
from megafast.pipeline.engine import Microbatch, PipelineEngine  # noqa: E402
from megafast.pipeline.partition import build_model_chunks  # noqa: E402
from megafast.planner.layout import Layout  # noqa: E402
from megafast.planner.memory import rank_memory  # noqa: E402
from megafast.planner.parameters import total_parameter_count  # noqa: E402
from megafast.training.data_parallel import DataParallel  # noqa: E402
from megafast.training.optimizer import OptimizerConfig, build_optimizer  # noqa: E402

VARIANTS = [("no_shard", 0.0), ("optim", 0.0), ("optim_grads", 0.0), ("optim_grads_params", 0.0),
            ("optim_grads_params", 1.0)]


def model_config(seq: int, layers: int = 12, hidden: int = 768) -> GPTConfig:
    return GPTConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=12, ffn_hidden_size=hidden * 8 // 3,
                     vocab_size=32000,
                     max_position_embeddings=seq, make_vocab_size_divisible_by=128, position_embedding_type="rope",
                     normalization="RMSNorm", activation="swiglu", add_bias_linear=False, tie_embeddings=True)


def state_bytes(chunks, ddp, opt) -> dict[str, int]:
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            s = t.untyped_storage()
            if s.nbytes() == 0 or s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        return total

    grads = size(b.grad_data for b in ddp.buffers)
    params = size([p for c in chunks for p in c.parameters()] + [b.param_data for b in ddp.buffers]
                  + [b.param_shards for b in ddp.buffers])
    device_optim, host_optim = [], []
    for s in opt.shards:
        st = [t for t in opt.optimizer.state.get(s.master, {}).values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        if s.offloaded:
            host_optim += [s.master, s.host_grad, *st]
        else:
            device_optim += ([] if s.alias else [s.master]) + st
    optim, host = size(device_optim), size(host_optim)
    return {"params": params, "grads": grads, "optimizer": optim, "host": host}


def _cpu_peak_delta(prof) -> int:
    """The peak of the running balance of the CPU allocator over the profile: every event's own
    allocations minus frees (``self_cpu_memory_usage``; frees outside any op are ``[memory]``
    events), in start-time order."""
    now = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def _worker(rank: int, world: int, init: str, a: argparse.Namespace, queue) -> None:
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    state = ParallelState.create(ParallelConfig(1, 1))
    config = model_config(a.seq_length, a.num_layers, a.hidden_size)
    out = []
    for strategy, fraction in VARIANTS:
        chunks = build_model_chunks(config, state, seed=1234, params_dtype=dtype, device=device)
        ddp = DataParallel(chunks, state, a.bucket_size_mb, sharding_strategy=strategy)
        opt = build_optimizer(chunks, ddp, state, OptimizerConfig(
            lr=1e-4, use_distributed_optimizer=strategy != "no_shard", bf16=a.bf16,
            optimizer_cpu_offload=fraction > 0, optimizer_offload_fraction=fraction or 1.0))
        engine = PipelineEngine(chunks, state, (a.seq_length, 1, config.hidden_size), dtype, device)
        g = torch.Generator().manual_seed(rank)
        mbs = [Microbatch(*(torch.randint(0, 32000, (1, a.seq_length), generator=g).to(device) for _ in range(2)),
                          torch.ones(1, a.seq_length, device=device)) for _ in range(a.microbatches)]
        denom = float(a.seq_length * a.microbatches * world)

        def step() -> None:
            ddp.set_last_microbatch(False)
            engine.run(mbs, denom, before_last_backward=lambda c: ddp.set_last_microbatch(True, chunk=c))
            opt.step()

        step()  # warm-up: the optimizer states exist from here on
        before = state_bytes(chunks, ddp, opt)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
            peak = sum(v for k, v in before.items() if k != "host") + _cpu_peak_delta(prof)
        times = []
        for _ in range(a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out.append({"strategy": strategy, "offload": fraction, "bytes": state_bytes(chunks, ddp, opt), "peak": peak,
                    "step_s": statistics.median(times)})
        del chunks, ddp, opt, engine
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def run(a: argparse.Namespace) -> list[list[dict]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, a.dp, init, a, queue)) for r in range(a.dp)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=a.timeout) for _ in procs)
        for p in procs:
            p.join()
    return [results[r] for r in range(a.dp)]


def report(a: argparse.Namespace, results: list[list[dict]]) -> str:
    config = model_config(a.seq_length, a.num_layers, a.hidden_size)
    n = total_parameter_count(config, padded=False)
    gb = 1e9
    rows = []
    for i, (strategy, fraction) in enumerate(VARIANTS):
        layout = Layout(dp=a.dp, micro_batch_size=1, num_microbatches=a.microbatches, seq_length=a.seq_length,
                        dtype="bf16" if a.bf16 else "fp32", bucket_size_mb=a.bucket_size_mb,
                        sharding_strategy=strategy, optimizer_offload_fraction=fraction)
        plan = rank_memory(config, layout, 0, 0, device=a.device)
        s = plan.static
        got = results[0][i]
        b = got["bytes"]
        measured = b["params"] + b["grads"] + b["optimizer"]
        name = strategy + (" + offload 1.0" if fraction else "")
        peaks = [r[i]["peak"] for r in results]
        rows.append(
            f"| {name} | {b['params'] / gb:.3f} / {s.weights / gb:.3f} | {b['grads'] / gb:.3f} / {s.gradients / gb:.3f} "
            f"| {b['optimizer'] / gb:.3f} / {(s.master_weights + s.optimizer_states) / gb:.3f} "
            f"| {b['host'] / gb:.3f} / {s.host / gb:.3f} | {measured / gb:.3f} / {s.total / gb:.3f} "
            f"| {max(peaks) / gb:.3f} / {plan.total / gb:.3f} | {max(r[i]['step_s'] for r in results):.2f} |")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{os.cpu_count()}-core CPU ({platform.machine()}), gloo, {a.threads} thread(s) per rank"
               if a.device == "cpu" else f"{torch.cuda.get_device_name(0)} x {a.dp}")
    return "\n".join([
        "## Memory per data-parallel sharding strategy (benchmarks/bench_memory.py)",
        "",
        f"- date: {now}",
        f"- machine: {machine}; load average {load:.1f} at the end of the run"
        + (" (the machine is shared with other jobs: step times are noisy, the byte counts are not)" if load > 1.5
           else ""),
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
        f"- model: {n / 1e6:.0f}M parameters ({a.num_layers} layers, hidden {a.hidden_size}, SwiGLU "
        f"{config.ffn_hidden_size}, vocabulary 32000, tied), "
        f"{'bf16' if a.bf16 else 'fp32'}, Adam; DP={a.dp}, {a.microbatches} micro-batch(es) of 1 x {a.seq_length} "
        f"tokens per rank, --ddp-bucket-size-mb {a.bucket_size_mb}",
        f"- command: `python benchmarks/bench_memory.py --dp {a.dp} --seq-length {a.seq_length} --microbatches "
        f"{a.microbatches} --steps {a.steps}{' --bf16' if a.bf16 else ''} --device {a.device}"
        + (f" --num-layers {a.num_layers} --hidden-size {a.hidden_size}" if (a.num_layers, a.hidden_size) != (12, 768)
           else "") + "`",
        "- each cell: measured / planner, GB (10^9 bytes) on DP rank 0. Model state: allocated tensors after a "
        "step (parameters incl. ZeRO buffers/shards, fp32 gradient buffers or shards, fp32 masters + optimizer "
        "states; host = offloaded masters, states and host gradient copies). Peak: "
        + ("torch.cuda.max_memory_allocated over one step" if a.device == "cuda" else
           "the model state plus the peak of the CPU allocator's running balance over one step (torch.profiler), "
           "the most loaded rank")
        + " against the planner's static + activation peak. Step: median seconds of the timed steps, slowest rank.",
        "",
        "| strategy | params | grads | optimizer | host | model state | peak during a step | step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-layers", type=int, default=12, help="smaller for a smoke run")
    p.add_argument("--hidden-size", type=int, default=768, help="smaller for a smoke run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bucket-size-mb", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--write-doc", default=None, help="replace this benchmark's section of the markdown file")
    a = p.parse_args(argv)
    text = report(a, run(a))
    print(text)
    if a.write_doc:
        write_section(a.write_doc, "bench_memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
