"""MoE benchmark: the MoE layer and the experts' grouped GEMM against a per-expert Python loop, forward + backward.

    python benchmarks/bench_moe.py [--out DIR] [--only grouped_gemm] [--reps 7] [--write-doc FILE.md]
    python benchmarks/bench_moe.py --smoke        # seconds: tiny shapes (a self-check of the script)

Each part of the benchmark is one function in :data:`PARTS` that appends :class:`Row` s (one per
implementation of one shape, all timed in the same run so the ratios compare like with like):

- ``grouped_gemm``: y = x @ w[e] over the rows of each expert (x [T*k, H] sorted by expert, w
  [E, H, F], tokens routed by top-k of random scores), forward + backward (dx, dw), for
  ``loop`` (``torch.split`` + one autograd matmul per expert + ``torch.cat``: the per-expert Python
  loop), ``torch`` (``grouped_gemm_torch``, megafast's CPU path) and, on a GPU, ``triton`` (the
  grouped kernel: one launch for y, one for dx, one for dw). Tokens/s counts the T tokens before
  top-k; the ratio is the loop's time over the implementation's.
- ``moe_layer``: the whole :class:`~megafast.model.moe.moe_layer.MoELayer` (router, permutation,
  experts, combine; softmax top-k, aux loss) on [T, 1, H] hidden states, forward + backward
  (input and every weight gradient), with the experts as the per-expert loop (``loop``:
  Megatron's SequentialMLP, ``--moe-grouped-gemm`` off) or the grouped GEMM (``grouped``: the torch
  twin on CPU, the Triton kernel on a GPU). Tokens/s counts the T tokens.

- ``dispatcher``: the MoE layer (router, token dispatcher, experts, combine) forward + backward
  at expert-parallel size EP = 2 and 4, one process per EP rank (gloo on CPU, nccl on GPUs), with
  the ``alltoall`` and the ``allgather`` token dispatcher (megafast.model.moe), T tokens per rank.
  Tokens/s counts the tokens of all EP ranks (EP x T) over the slowest rank's median step; the
  ratio is all-gather's time over this dispatcher's. The layer's outputs at EP are checked
  against the EP = 1 layer on each rank's tokens first. Its table is the ``bench_moe_ep`` section.

Later parts slot into :data:`PARTS` with the same :class:`Row` (``part`` names them; ``impl`` the
variant, ``ranks`` the EP size) and share the timing and the table.

CPU: fp32 at small shapes (about a minute). GPU: bf16 at Mixtral-like (hidden 4096, expert FFN
14336, 8 experts, top-2, 16k tokens) and Qwen2-MoE-like (2048, 1408, 60 experts, top-4) shapes.
Every implementation's output and gradients are checked against the loop's before timing (the
script exits 1 on a mismatch). Results: ``bench_moe.json`` and ``bench_moe.md`` under ``--out``
(default ``$OUT`` or benchmarks/results); ``--write-doc`` replaces the ``bench_moe`` section of that
markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from doc_section import write_section  # noqa: E402
from megafast.kernels.grouped_gemm_kernel import grouped_gemm, grouped_gemm_torch  # noqa: E402

SECTION = "bench_moe"
# (name, tokens T, hidden H, expert FFN F, experts E, top-k)
CPU_SHAPES = (
    ("mixtral-like/32", 2048, 256, 448, 8, 2),
    ("qwen2-moe-like/16", 2048, 128, 88, 60, 4),
)
GPU_SHAPES = (
    ("mixtral-like", 16384, 4096, 14336, 8, 2),
    ("qwen2-moe-like", 16384, 2048, 1408, 60, 4),
)
SMOKE_SHAPES = (("smoke", 64, 32, 48, 4, 2),)
EP_SIZES = (2, 4)  # dispatcher part: expert-parallel sizes (one process each)


@dataclass
class Row:
    """One implementation of one benchmarked shape."""

    part: str  # grouped_gemm (later: moe_layer, dispatcher)
    shape: str
    impl: str
    dtype: str
    ms: float  # forward + backward, median
    tokens_per_s: float
    vs_baseline: Optional[float] = None  # baseline time / this time (>1: faster than the baseline)
    baseline: str = ""
    max_rel_err: Optional[float] = None
    ranks: int = 1  # expert-parallel ranks (dispatcher comparisons)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each of ``fns`` over ``reps`` calls after ``warmup``, synchronising a
    GPU; the functions take turns within each repetition, so a change of machine load hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    den = b64.norm().item()
    return (a64 - b64).norm().item() / den if den else (a64 - b64).norm().item()


# ----------------------------------------------------------------------------------- grouped GEMM


def routed_counts(tokens: int, experts: int, top_k: int, device: torch.device) -> torch.Tensor:
    """tokens_per_expert of top-k routing on random scores (a realistic, uneven spread)."""
    scores = torch.randn(tokens, experts, device=device)
    idx = scores.topk(top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(idx, minlength=experts)


def loop_grouped_gemm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The per-expert Python loop: split the rows by expert, one matmul each, concatenate (the weights
    unbound once, as separate per-expert parameters would be: ``w[e]`` would cost a full [E, H, F]
    zero gradient per expert in backward)."""
    parts = x.split(tokens_per_expert.tolist())
    return torch.cat([p @ w_e for p, w_e in zip(parts, w.unbind(0))])


def bench_grouped_gemm(rows: list[Row], shapes, dtype: torch.dtype, device: torch.device, reps: int) -> None:
    impls = {"loop": loop_grouped_gemm, "torch": grouped_gemm_torch}
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        impls["triton"] = grouped_gemm
    for name, tokens, hidden, ffn, experts, top_k in shapes:
        counts = routed_counts(tokens, experts, top_k, device)
        n = tokens * top_k
        x = (torch.randn(n, hidden, device=device) / 2).to(dtype).requires_grad_()
        w = (torch.randn(experts, hidden, ffn, device=device) / hidden**0.5).to(dtype).requires_grad_()
        dy = torch.randn(n, ffn, device=device).to(dtype)
        shape = f"{name}: T={tokens} k={top_k} E={experts} {n}x{hidden} @ [{experts}, {hidden}, {ffn}]"
        results, steps = {}, {}
        for impl, fn in impls.items():
            y = fn(x, w, counts)
            results[impl] = (y, *torch.autograd.grad(y, (x, w), dy))

            def step(fn=fn):
                y = fn(x, w, counts)
                torch.autograd.grad(y, (x, w), dy)

            steps[impl] = step
        for impl, ms in time_ms(steps, device, reps).items():
            err = None
            if impl != "loop":
                err = max(rel_err(a, b) for a, b in zip(results[impl], results["loop"]))
            rows.append(Row("grouped_gemm", shape, impl, str(dtype).replace("torch.", ""), ms,
                            tokens / (ms / 1e3), max_rel_err=err))
            print(f"{shape} {impl}: {ms:.2f} ms fwd+bwd, {tokens / (ms / 1e3):,.0f} tokens/s"
                  + (f", max rel err {err:.1e}" if err is not None else ""), flush=True)
        base = next(r for r in rows if r.shape == shape and r.impl == "loop")
        for r in rows:
            if r.shape == shape:
                r.baseline, r.vs_baseline = "loop", base.ms / r.ms


# ------------------------------------------------------------------------------------------ MoE layer


def bench_moe_layer(rows: list[Row], shapes, dtype: torch.dtype, device: torch.device, reps: int) -> None:
    from megafast.config import GPTConfig
    from megafast.model.moe.moe_layer import MoELayer
    from megafast.parallel.state import ParallelState

    for name, tokens, hidden, ffn, experts, top_k in shapes:
        heads = max(1, hidden // 64)
        shape = f"{name}: T={tokens} H={hidden} F={ffn} E={experts} top-{top_k}"
        x = (torch.randn(tokens, 1, hidden, device=device) / 2).to(dtype)
        dy = torch.randn(tokens, 1, hidden, device=device).to(dtype)
        results, steps = {}, {}
        for impl, grouped in (("loop", False), ("grouped", True)):
            config = GPTConfig(num_layers=1, hidden_size=hidden, num_attention_heads=heads, vocab_size=128,
                               ffn_hidden_size=ffn, activation="swiglu", add_bias_linear=False,
                               normalization="RMSNorm", position_embedding_type="rope", num_experts=experts,
                               moe_router_topk=top_k, moe_ffn_hidden_size=ffn, moe_aux_loss_coeff=0.01,
                               moe_grouped_gemm=grouped)
            layer = MoELayer(config, ParallelState.single(), 0, seed=0, params_dtype=dtype, device=device).train()
            inp = x.clone().requires_grad_()
            params = [inp, *layer.parameters()]
            y = layer(inp)
            results[impl] = (y, *torch.autograd.grad(y, params, dy))

            def step(layer=layer):
                inp = x.clone().requires_grad_()
                torch.autograd.grad(layer(inp), [inp, *layer.parameters()], dy)

            steps[impl] = step
        for impl, ms in time_ms(steps, device, reps).items():
            err = None if impl == "loop" else max(rel_err(a, b) for a, b in zip(results[impl], results["loop"]))
            rows.append(Row("moe_layer", shape, impl, str(dtype).replace("torch.", ""), ms,
                            tokens / (ms / 1e3), max_rel_err=err))
            print(f"{shape} {impl}: {ms:.2f} ms fwd+bwd, {tokens / (ms / 1e3):,.0f} tokens/s"
                  + (f", max rel err {err:.1e}" if err is not None else ""), flush=True)
        base = next(r for r in rows if r.shape == shape and r.part == "moe_layer" and r.impl == "loop")
        for r in rows:
            if r.shape == shape and r.part == "moe_layer":
                r.baseline, r.vs_baseline = "loop", base.ms / r.ms



# -------------------------------------------------------------------------- EP token dispatchers


def _dispatcher_worker(rank: int, world: int, init_file: str, shape: tuple, dtype: str, reps: int, queue) -> None:
    """One EP rank: time the MoE layer with each dispatcher; put (rank, {impl: (ms, max err)})."""
    import torch.distributed as dist

    from megafast.config import GPTConfig, ParallelConfig
    from megafast.model.moe import MoELayer
    from megafast.parallel.state import ParallelState

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, tokens, hidden, ffn, experts, top_k = shape
        state = ParallelState.create(ParallelConfig(expert_model_parallel_size=world))
        dt = getattr(torch, dtype)
        gen = torch.Generator().manual_seed(1234 + rank)
        x = torch.randn(tokens, 1, hidden, generator=gen).to(device=device, dtype=dt)
        dy = torch.randn(tokens, 1, hidden, generator=gen).to(device=device, dtype=dt)
        steps, errors = {}, {}
        for impl in ("alltoall", "allgather"):
            config = GPTConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, vocab_size=128,
                               ffn_hidden_size=ffn, position_embedding_type="rope", normalization="RMSNorm",
                               activation="swiglu", add_bias_linear=False, num_experts=experts,
                               moe_ffn_hidden_size=ffn, moe_router_topk=top_k, moe_grouped_gemm=True,
                               moe_token_dispatcher_type=impl)
            layer = MoELayer(config, state, 1, seed=7, params_dtype=dt, device=device)
            reference = MoELayer(config, ParallelState.single(), 1, seed=7, params_dtype=dt, device=device)
            with torch.no_grad():
                errors[impl] = rel_err(layer(x), reference(x))
            xg = x.clone().requires_grad_()

            def step(layer=layer, xg=xg) -> None:
                layer(xg).backward(dy)

            steps[impl] = step
        # the two dispatchers take turns in every repetition (same order on every rank: the collectives match)
        out = {impl: (ms, errors[impl]) for impl, ms in time_ms(steps, device, reps).items()}
        queue.put((rank, True, out))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put((rank, False, repr(exc)))
    finally:
        dist.destroy_process_group()


def bench_dispatcher(rows: list[Row], shapes, dtype: torch.dtype, device: torch.device, reps: int) -> None:
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for shape in shapes[:1]:  # the first (Mixtral-like) shape
        name, tokens, hidden, ffn, experts, top_k = shape
        for ep in EP_SIZES:
            if experts % ep or (device.type == "cuda" and torch.cuda.device_count() < ep):
                print(f"dispatcher EP={ep}: skipped ({experts} experts, {torch.cuda.device_count()} GPUs)")
                continue
            queue = ctx.Queue()
            with tempfile.TemporaryDirectory(prefix="bench-moe-ep-") as tmp:
                args = (os.path.join(tmp, "store"), shape, str(dtype).replace("torch.", ""), reps, queue)
                procs = [ctx.Process(target=_dispatcher_worker, args=(r, ep) + args) for r in range(ep)]
                for proc in procs:
                    proc.start()
                results = [queue.get(timeout=3600) for _ in procs]
                for proc in procs:
                    proc.join()
            failed = [r for r in results if not r[1]]
            if failed:
                raise RuntimeError(f"dispatcher EP={ep} rank {failed[0][0]} failed: {failed[0][2]}")
            label = f"{name}: T={tokens}/rank k={top_k} E={experts} h={hidden} F={ffn}"
            for impl in ("alltoall", "allgather"):
                ms = max(r[2][impl][0] for r in results)  # the slowest rank's median step
                err = max(r[2][impl][1] for r in results)
                rows.append(Row("dispatcher", label, impl, str(dtype).replace("torch.", ""), ms,
                                ep * tokens / (ms / 1e3), max_rel_err=err, ranks=ep))
                print(f"{label} EP={ep} {impl}: {ms:.2f} ms fwd+bwd, {ep * tokens / (ms / 1e3):,.0f} tokens/s, "
                      f"max rel err vs EP=1 {err:.1e}", flush=True)
            base = next(r for r in rows if r.part == "dispatcher" and r.ranks == ep and r.shape == label
                        and r.impl == "allgather")
            for r in rows:
                if r.part == "dispatcher" and r.ranks == ep and r.shape == label:
                    r.baseline, r.vs_baseline = "allgather", base.ms / r.ms


PARTS = {"grouped_gemm": bench_grouped_gemm, "moe_layer": bench_moe_layer, "dispatcher": bench_dispatcher}
SECTIONS = {"grouped_gemm": SECTION, "moe_layer": SECTION, "dispatcher": "bench_moe_ep"}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# ------------------------------------------------------------------------------------------ report


def versions(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = (torch.cuda.get_device_name() if device.type == "cuda"
                      else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def render_dispatcher_markdown(info: dict, rows: list[Row], command: str, note: str = "") -> str:
    lines = [f"### MoE expert parallelism: all-to-all vs all-gather token dispatcher ({info['date']}, "
             f"{info['device']})", "",
             f"- command: `{command}`",
             f"- versions: torch {info['torch']}, Python {info['python']}, one torch thread per EP rank "
             "(one process each; gloo on CPU)",
             "- the MoE layer (router, dispatch, grouped-GEMM experts, combine) forward + backward at EP ranks, "
             "median step of the slowest rank; tokens/s = EP x T / step; `x allgather` = all-gather's time / "
             "this time; max rel err = the layer's output at EP against the EP = 1 layer (all experts on one "
             "rank) on the same tokens"]
    if note:
        lines.append(f"- {note}")
    lines += ["", "| shape | EP | dispatcher | dtype | fwd+bwd ms | tokens/s | x allgather | max rel err |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        ratio = "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}"
        lines.append(f"| {r.shape} | {r.ranks} | {r.impl} | {r.dtype} | {r.ms:.2f} | {r.tokens_per_s:,.0f} | "
                     f"{ratio} | {err} |")
    return "\n".join(lines) + "\n"


def render_markdown(info: dict, rows: list[Row], command: str, note: str = "") -> str:
    lines = [f"## MoE: the layer and the grouped GEMM vs the per-expert loop ({info['date']}, {info['device']})", "",
             f"- command: `{command}`",
             f"- versions: torch {info['torch']}, triton {info['triton']}, Python {info['python']}, "
             f"{info['threads']} torch threads",
             "- forward + backward, median wall time: `grouped_gemm` one grouped GEMM (y, dx, dw); `moe_layer` "
             "the whole MoE layer (router, permute, experts, combine; input and weight gradients) with "
             "the experts as the per-expert loop or the grouped GEMM; tokens/s counts the T tokens before "
             "top-k; `x loop` = the loop's time / this time"]
    if note:
        lines.append(f"- {note}")
    lines += ["", "| part | shape | impl | dtype | fwd+bwd ms | tokens/s | x loop | max rel err |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        ratio = "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}"
        lines.append(f"| {r.part} | {r.shape} | {r.impl} | {r.dtype} | {r.ms:.2f} | {r.tokens_per_s:,.0f} | "
                     f"{ratio} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 7 on CPU, 20 on GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repetition (checks the script)")
    p.add_argument("--write-doc", default=None, help="replace the bench_moe section of this markdown file")
    p.add_argument("--note", default="", help="a line added to the report (e.g. the machine's load)")
    args = p.parse_args(argv)
    parts = [s for s in args.only.split(",") if s]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    reps = 1 if args.smoke else args.reps or (20 if device.type == "cuda" else 7)
    torch.manual_seed(0)
    info = versions(device)
    print(json.dumps(info), flush=True)
    rows: list[Row] = []
    for part in parts:
        PARTS[part](rows, shapes, dtype, device, reps)
    bad = [r for r in rows if r.max_rel_err is not None and not r.max_rel_err <= TOLERANCE[dtype]]
    command = "python benchmarks/bench_moe.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    gemm_rows = [r for r in rows if r.part != "dispatcher"]
    ep_rows = [r for r in rows if r.part == "dispatcher"]
    texts = {}  # docs section -> markdown
    if gemm_rows:
        texts[SECTION] = render_markdown(info, gemm_rows, command.strip(), args.note)
    if ep_rows:
        texts[SECTIONS["dispatcher"]] = render_dispatcher_markdown(info, ep_rows, command.strip(), args.note)
    text = "\n".join(texts.values())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
        json.dump({"info": info, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(args.out, "bench_moe.md"), "w") as f:
        f.write(text)
    print(text)
    if args.write_doc and not bad:
        for section, body in texts.items():
            write_section(args.write_doc, section, body)
    for r in bad:
        print(f"FAIL {r.part} {r.shape} {r.impl}: max rel err {r.max_rel_err:.1e} > {TOLERANCE[dtype]:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
