"""End-to-end training speed on one device: megafast's trainer vs plain PyTorch + transformers.

    # GPU machine, one command: build megafast._C with its CUDA kernels (1-2 min), then both sides
    python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 && \
        python3 benchmarks/bench_train.py --out $OUT
    # back here: put the results into the doc without running anything
    python benchmarks/bench_train.py --from-json $OUT/bench_train.json --write-doc docs/benchmarks.md
    # CPU smoke (tests/test_bench_train.py): tiny model, fp32
    python benchmarks/bench_train.py --device cpu --num-layers 2 --hidden-size 64 ... --out DIR

Default model: the Llama-3.2-1B shape (16 layers, hidden 2048, 32 heads / 8 query groups, SwiGLU
FFN 8192, vocabulary 128256, tied embeddings, RMSNorm eps 1e-5, RoPE base 500000, no biases),
sequence 2048, micro-batch 4, global batch 16 (4 accumulation steps), bf16 on CUDA (fp32 on CPU),
AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 on matrices only), clip 1.0, constant lr 3e-4.
Both sides see the same random-token batches (``MockGPTDataset``, Megatron's sampler order) and
start from the same weights, so their losses must agree (to rounding in fp32, ~1e-3 in bf16).

1. megafast: ``pretrain_gpt.py``'s own code (``trainer.setup`` + ``trainer.train``) in this process,
   as ``python pretrain_gpt.py --mock-data --log-interval 1 --log-jsonl ...`` would run it (a world
   of one: nccl on CUDA, gloo on CPU); ``--bf16`` = bf16 weights, fp32 main grads and masters.
   Per-iteration wall times come from its ``--log-jsonl`` (the trainer reads the loss on the host
   at each log, here every iteration, so they are device times).
2. baseline: ``transformers.LlamaForCausalLM`` (SDPA attention) of the same config with
   megafast's initial weights (megafast.convert.hf_llama's key map), fp32 parameters,
   ``torch.autocast(bfloat16)``, ``F.cross_entropy`` on float logits, ``torch.optim.AdamW(fused=True)``
   on CUDA, ``clip_grad_norm_``, the same gradient accumulation; timed the same way.

Both sides: step time = mean wall time of the ``--timed-iters`` iterations after ``--warmup-iters``;
tokens/s = global batch x seq / step time; TFLOP/s = ``megafast.planner.training_flops_per_token``
(model FLOPs: 3 x forward, causal attention halved) x tokens/s; MFU = TFLOP/s /
``device_peak_tflops`` (H100 bf16: 989). The planner's predicted step time and memory of the
megafast run (``planner.throughput.step_time``, ``planner.memory.peak_memory``) are set against
the measured ones (``torch.cuda.max_memory_allocated``). Results go to ``--out``
(``bench_train.json``, ``bench_train.md``) after each side, so a run cut short keeps what it
measured; a side that fails (out of memory, ...) is recorded and the other still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megafast.arguments import model_config, parse_args, validate_args  # noqa: E402
from megafast.atomic_file import atomic_write  # noqa: E402
from megafast.config import GPTConfig  # noqa: E402
from megafast.data.mock_dataset import MockGPTDataset  # noqa: E402
from megafast.data.sampler import MicroBatchSampler  # noqa: E402
from megafast.planner import (  # noqa: E402
    Layout,
    device_peak_tflops,
    total_parameter_count,
    training_flops_per_token,
)
from megafast.planner.memory import GB, peak_memory, resolve_kernels  # noqa: E402
from megafast.planner.throughput import Cluster, step_time  # noqa: E402
from doc_section import write_section  # noqa: E402

SECTION = "bench_train"
# HBM bandwidth (GB/s) for the planner's optimizer-step time; other devices: Cluster's default.
HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


@dataclass(frozen=True)
class BenchSetup:
    """What both sides run: the model (the trainer's own GPTConfig), batch shape, recipe, timing."""

    config: GPTConfig
    megafast_argv: tuple[str, ...]
    device: torch.device
    dtype: str  # "bf16" | "fp32"
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    warmup_iters: int
    timed_iters: int
    seed: int
    lr: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    clip_grad: float
    peak_tflops: float  # MFU denominator, the trainer's too (--gpu-peak-tflops)
    flops_per_token: float  # model FLOPs of one trained token, both sides

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    @property
    def train_iters(self) -> int:
        return self.warmup_iters + self.timed_iters

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


# ------------------------------------------------------------------------------------ set-up


def megafast_argv(
    a: argparse.Namespace, device: torch.device, dtype: str, log_jsonl: str, peak_tflops: float
) -> list[str]:
    """``pretrain_gpt.py`` flags of the benchmark run (Megatron's names)."""
    argv = [
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--ffn-hidden-size", str(a.ffn_hidden_size), "--num-attention-heads", str(a.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(a.num_query_groups),
        "--position-embedding-type", "rope", "--rotary-base", str(a.rotary_base),
        "--normalization", "RMSNorm", "--norm-epsilon", str(a.norm_epsilon), "--swiglu",
        "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--init-method-std", str(a.init_method_std), "--vocab-size", str(a.vocab_size), "--mock-data",
        "--seq-length", str(a.seq_length), "--max-position-embeddings", str(a.seq_length),
        "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
        "--train-iters", str(a.warmup_iters + a.timed_iters), "--seed", str(a.seed),
        "--lr", str(a.lr), "--min-lr", str(a.lr), "--lr-decay-style", "constant",
        "--weight-decay", str(a.weight_decay), "--adam-beta1", str(a.adam_beta1),
        "--adam-beta2", str(a.adam_beta2), "--adam-eps", str(a.adam_eps), "--clip-grad", str(a.clip_grad),
        "--log-interval", "1", "--eval-iters", "0", "--log-jsonl", log_jsonl, "--device", device.type,
        "--gpu-peak-tflops", str(peak_tflops),
    ]
    if a.untie_embeddings:
        argv.append("--untie-embeddings-and-output-weights")
    if dtype == "bf16":
        argv.append("--bf16")
    return argv + shlex.split(a.megafast_args)


def build_setup(a: argparse.Namespace) -> BenchSetup:
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device: use --device cpu")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if a.warmup_iters < 0 or a.timed_iters < 1:
        raise SystemExit("error: need --warmup-iters >= 0 and --timed-iters >= 1")
    os.makedirs(a.out, exist_ok=True)
    matmul_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak = a.gpu_peak_tflops or device_peak_tflops(device, matmul_dtype)
    log = os.path.join(os.path.abspath(a.out), "megafast_train.jsonl")
    argv = megafast_argv(a, device, dtype, log, peak)
    # The trainer's own flag parsing and config mapping: the FLOP and memory models and the HF
    # baseline are built from exactly the GPTConfig the trainer builds.
    targs = parse_args(argv)
    validate_args(targs, 1, None)
    config = model_config(targs, targs.vocab_size)
    return BenchSetup(
        config, tuple(argv), device, dtype, targs.seq_length, targs.micro_batch_size, targs.global_batch_size,
        a.warmup_iters, a.timed_iters, targs.seed, targs.lr, targs.adam_beta1, targs.adam_beta2,
        targs.adam_eps, targs.weight_decay, targs.clip_grad, peak,
        training_flops_per_token(config, targs.seq_length),  # TP = 1: the vocabulary padded for one rank
    )


def environment(setup: BenchSetup) -> dict[str, Any]:
    def version(module: str) -> Optional[str]:
        try:
            return getattr(__import__(module), "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: reported as absent
            return None

    from megafast.kernels.cuda_ext import cuda_available

    cuda = setup.device.type == "cuda"
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(setup.device) if cuda else f"CPU ({platform.machine()}, "
                                                                        f"{os.cpu_count()} cores)",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": version("triton"), "transformers": version("transformers"),
        "flash_attn": version("flash_attn"),
        "megafast_cuda_ext": cuda_available(),
        "command": "python benchmarks/bench_train.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
    }


def config_record(setup: BenchSetup, label: str) -> dict[str, Any]:
    """The run's settings as they go into bench_train.json (and the doc)."""
    c = setup.config
    model = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
             "vocab_size", "tie_embeddings", "rotary_base", "norm_epsilon")
    run = ("seq_length", "micro_batch_size", "global_batch_size", "num_microbatches", "tokens_per_step",
           "warmup_iters", "timed_iters", "dtype", "seed", "lr", "adam_beta1", "adam_beta2", "adam_eps",
           "weight_decay", "clip_grad")
    return {**{k: getattr(c, k) for k in model}, **{k: getattr(setup, k) for k in run}, "label": label,
            "parameters": total_parameter_count(c, padded=False), "device_type": setup.device.type,
            "megafast_argv": list(setup.megafast_argv)}


def free_device_memory(device: torch.device) -> None:
    """Drop everything unreferenced and reset the peak counter before the next side."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None


def peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def summarize(setup: BenchSetup, step_times: list[float]) -> dict:
    """Step time = mean over the timed iterations; tokens/s, model TFLOP/s and MFU from it."""
    timed = step_times[setup.warmup_iters:]
    if not timed:
        raise RuntimeError(f"only {len(step_times)} iterations ran, none after the warm-up")
    step = sum(timed) / len(timed)
    tokens_per_s = setup.tokens_per_step / step
    tflops = setup.flops_per_token * tokens_per_s / 1e12  # one device
    return {"step_time_s": step, "step_time_min_s": min(timed), "step_time_max_s": max(timed),
            "tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops, "mfu": tflops / setup.peak_tflops,
            "step_times_s": step_times}


# ---------------------------------------------------------------------------------- megafast


def run_megafast(setup: BenchSetup) -> tuple[dict, Optional[dict[str, torch.Tensor]]]:
    """Train with the trainer's code; return (result, the initial weights on the CPU)."""
    import torch.distributed as dist

    from megafast.training import trainer

    log_path = setup.megafast_argv[setup.megafast_argv.index("--log-jsonl") + 1]
    if os.path.exists(log_path):
        os.remove(log_path)  # the logger appends
    result: dict[str, Any] = {"name": "megafast", "error": None}
    weights = None
    run = None
    try:
        run = trainer.setup(list(setup.megafast_argv))
        result["memory_after_setup_gb"] = allocated_gb(setup.device)
        weights = {n: p.detach().to("cpu", copy=True) for n, p in run.chunks[0].named_parameters()}
        result["implementation"] = describe_megafast(run, setup)
        try:
            trainer.train(run)
        finally:
            run.logger.close()
        result["peak_memory_gb"] = peak_gb(setup.device)
        result["memory_after_training_gb"] = allocated_gb(setup.device)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded, the other side still runs
        result["error"] = f"{type(e).__name__}: {e}".strip()[:500]
        traceback.print_exc()
        result["peak_memory_gb"] = peak_gb(setup.device)
    finally:
        del run
        if dist.is_initialized():
            dist.destroy_process_group()
    records = _read_jsonl(log_path)
    result["losses"] = [r["lm_loss"] for r in records]
    result["first_loss"] = records[0]["lm_loss"] if records and records[0]["iteration"] == 1 else None
    if records and result["error"] is None:
        result.update(summarize(setup, [r["elapsed_ms_per_iteration"] / 1000 for r in records]))
        logged = [r["tflops_per_gpu"] for r in records[setup.warmup_iters:]]
        result["trainer_logged_mean_tflops"] = sum(logged) / len(logged)  # cross-check: same FLOP model
    return result, weights


def describe_megafast(run: Any, setup: BenchSetup) -> dict[str, Any]:
    """Backend, kernels, optimizer and weight dtype of the run, for the doc (best effort: a
    failure here is noted, it does not cost the measurement)."""
    import torch.distributed as dist

    try:
        cuda_step = getattr(run.optimizer, "cuda_step", False)
        kernels = resolve_kernels(run.config, planner_layout(setup), setup.device.type)
        return {
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "kernels": dataclasses.asdict(kernels),
            "optimizer": "megafast._C multi-tensor AdamW" if cuda_step
            else "torch.optim.AdamW" + (" (fused)" if setup.device.type == "cuda" else ""),
            "params_dtype": str(next(run.chunks[0].parameters()).dtype).removeprefix("torch."),
        }
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("type") == "train"]


# ---------------------------------------------------------------------------------- baseline


def hf_state_dict(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megafast parameters (one TP=1 chunk) -> HF Llama tensors: unpad the vocabulary, then the
    converter's explicit key map (fused QKV split per group, fc1 split into gate and up)."""
    from megafast.checkpoint import layout
    from megafast.convert import hf_keymap, hf_llama

    full = {n: (t[: config.vocab_size] if n in layout.VOCAB_TENSORS else t) for n, t in weights.items()}
    expected = {n for _, specs in layout.groups(config) for n in specs}
    if set(full) != expected:
        raise ValueError(f"megafast parameters differ from the converter's: {sorted(set(full) ^ expected)}")
    out: dict[str, torch.Tensor] = {}
    for _, rules in hf_llama.rule_groups(config):
        out.update(hf_keymap.export_group(rules, full, config))
    return out


def build_hf_model(setup: BenchSetup, weights: Optional[dict[str, torch.Tensor]]) -> torch.nn.Module:
    """LlamaForCausalLM of the same config, fp32 parameters, SDPA; megafast's weights when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megafast.convert import hf_llama

    hf_config = LlamaConfig.from_dict(hf_llama.config_to_hf(setup.config, {}, torch.float32),
                                      attn_implementation="sdpa")
    hf_config.use_cache = False
    with torch.device(setup.device):
        model = LlamaForCausalLM(hf_config)
    if weights is not None:
        missing, unexpected = model.load_state_dict(hf_state_dict(setup.config, weights), strict=False)
        tied = {"lm_head.weight"} if setup.config.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"HF model state mismatch: missing {missing}, unexpected {unexpected}")
    return model.train()


def run_hf(setup: BenchSetup, weights: Optional[dict[str, torch.Tensor]]) -> dict:
    """The plain PyTorch mixed-precision recipe on the same batches, timed like the trainer."""
    result: dict[str, Any] = {"name": "hf", "error": None, "memory_before_gb": allocated_gb(setup.device),
                              "weights": "megafast's initial weights" if weights is not None else "HF init"}
    step_times: list[float] = []
    losses: list[float] = []
    try:
        model = build_hf_model(setup, weights)
        cuda = setup.device.type == "cuda"
        result["implementation"] = {
            "attention": getattr(model.config, "_attn_implementation", None),
            "optimizer": "torch.optim.AdamW" + (" (fused)" if cuda else ""),
            "params_dtype": "float32", "autocast": "bfloat16" if setup.dtype == "bf16" else None,
        }
        # Megatron's (and nanoGPT's) decay rule: matrices decay, 1-D tensors (norm weights) do not.
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": setup.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=setup.lr, betas=(setup.adam_beta1, setup.adam_beta2),
                                eps=setup.adam_eps, fused=True if cuda else None)
        dataset = MockGPTDataset(setup.train_iters * setup.global_batch_size, setup.seq_length,
                                 setup.config.vocab_size, setup.seed)
        sampler = iter(MicroBatchSampler(len(dataset), 0, setup.micro_batch_size, 0, 1))
        autocast = torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.dtype == "bf16")
        start = time.perf_counter()
        for _ in range(setup.train_iters):
            batches = [_batch(dataset, next(sampler), setup.device) for _ in range(setup.num_microbatches)]
            # loss = sum over the global batch's unmasked tokens / their count (the trainer's)
            denominator = sum(mask.sum() for _, _, mask in batches).clamp_min(1.0)
            loss_sum = torch.zeros((), device=setup.device)
            for tokens, labels, mask in batches:
                with autocast:
                    logits = model(input_ids=tokens, use_cache=False).logits  # [b, s, V]
                token_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
                loss = (token_loss * mask.flatten()).sum()
                (loss / denominator).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(params, setup.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append((loss_sum / denominator).item())  # syncs, as the trainer's .item() does
            now = time.perf_counter()
            step_times.append(now - start)
            start = now
        result["peak_memory_gb"] = peak_gb(setup.device)
        result.update(summarize(setup, step_times))
    except Exception as e:  # noqa: BLE001 - recorded (e.g. out of memory)
        result["error"] = f"{type(e).__name__}: {e}".strip()[:500]
        result["peak_memory_gb"] = peak_gb(setup.device)
        traceback.print_exc()
    result["losses"] = losses
    result["first_loss"] = losses[0] if losses else None
    return result


def _batch(dataset: MockGPTDataset, indices: list[int], device: torch.device):
    items = [dataset[i] for i in indices]
    return tuple(torch.stack([it[k] for it in items]).to(device) for k in ("tokens", "labels", "loss_mask"))


# ----------------------------------------------------------------------------------- planner


def planner_layout(setup: BenchSetup) -> Layout:
    """The single-device layout of the run, recomputation as the trainer's config has it (a
    ``--megafast-args '--recompute-granularity full'`` run is predicted as such)."""
    c = setup.config
    return Layout(micro_batch_size=setup.micro_batch_size, num_microbatches=setup.num_microbatches,
                  seq_length=setup.seq_length, dtype=setup.dtype, recompute=c.recompute_granularity,
                  recompute_method=c.recompute_method or "uniform",
                  recompute_num_layers=c.recompute_num_layers or 1)


def planner_comparison(setup: BenchSetup, device_name: str, megafast: dict,
                       compute_efficiency: float, hbm_gbps: Optional[float]) -> dict:
    """Predicted step time and memory of the megafast run against the measured ones."""
    layout = planner_layout(setup)
    hbm = hbm_gbps or next((v for k, v in HBM_GBPS.items() if k in device_name), Cluster(1).hbm_gbps)
    cluster = Cluster(num_gpus=1, gpu_tflops=setup.peak_tflops, hbm_gbps=hbm,
                      compute_efficiency=compute_efficiency)
    t = step_time(setup.config, layout, cluster)
    out: dict[str, Any] = {"cluster": dataclasses.asdict(cluster), "predicted_step": dataclasses.asdict(t),
                           "predicted_step_time_s": t.total}
    measured = megafast.get("step_time_s")
    if measured:
        out["measured_step_time_s"] = measured
        out["measured_over_predicted"] = measured / t.total
        other = t.total - t.compute  # what the model does not scale with efficiency (optimizer here)
        if measured > other:  # the efficiency that would make the prediction exact
            out["implied_compute_efficiency"] = compute_efficiency * t.compute / (measured - other)
    mem = peak_memory(setup.config, layout, setup.device.type)
    out["predicted_memory_gb"] = mem.breakdown_gb()
    out["predicted_static_gb"] = mem.static.total / GB
    out["measured_peak_memory_gb"] = megafast.get("peak_memory_gb")
    out["measured_after_training_gb"] = megafast.get("memory_after_training_gb")  # weights+grads+optimizer
    return out


# ----------------------------------------------------------------------------------- reports


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def _f(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ratio(a: dict, b: dict, key: str) -> Optional[float]:
    return a[key] / b[key] if a.get(key) and b.get(key) else None


def ratios(results: dict) -> dict:
    """megafast / baseline figures, and how far apart their losses are (same weights and batches:
    equal up to rounding in fp32, iteration after iteration, when the recipes are the same)."""
    ours, base = results["sides"].get("megafast", {}), results["sides"].get("hf", {})
    out = {k: _ratio(ours, base, k) for k in ("tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gb")}
    if ours.get("first_loss") is not None and base.get("first_loss") is not None:
        out["first_loss_rel_diff"] = abs(ours["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
    pairs = list(zip(ours.get("losses", []), base.get("losses", [])))
    out["loss_max_rel_diff"] = max((abs(m - h) / abs(h) for m, h in pairs), default=None)
    return out


def _header_lines(results: dict) -> list[str]:
    """Heading and the set-up: device, versions, model, batch, timing and FLOP rules, both recipes."""
    env, cfg, sides = results["environment"], results["config"], results["sides"]
    impl_m = sides.get("megafast", {}).get("implementation", {})
    impl_h = sides.get("hf", {}).get("implementation", {})
    kernels = impl_m.get("kernels", {})
    masters = "fp32 main grads and master weights" if cfg["dtype"] != "fp32" else "fp32 main grads"
    return [
        f"## Training throughput, one device: megafast vs plain PyTorch + transformers ({cfg['label']})",
        "",
        f"- date: {env['date']}; device: {env['device']}",
        (f"- versions: Python {env['python']}, torch {env['torch']} (CUDA {env['cuda'] or 'none'}), "
         f"triton {env['triton']}, transformers {env['transformers']}, flash-attn "
         f"{env['flash_attn'] or 'not installed'}, megafast CUDA extension "
         f"{'built' if env['megafast_cuda_ext'] else 'absent'}"),
        (f"- model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} "
         f"heads / {cfg['num_query_groups']} query groups, SwiGLU FFN {cfg['ffn_hidden_size']}, vocabulary "
         f"{cfg['vocab_size']}, {'tied' if cfg['tie_embeddings'] else 'untied'} embeddings, RMSNorm, RoPE "
         f"base {cfg['rotary_base']:g}, no biases; {_count(cfg['parameters'])} parameters"),
        (f"- batch: seq {cfg['seq_length']}, micro-batch {cfg['micro_batch_size']}, global batch "
         f"{cfg['global_batch_size']} ({cfg['num_microbatches']} accumulation steps, "
         f"{cfg['tokens_per_step']:,} tokens per step), {cfg['dtype']}; random tokens, the same batches and "
         f"initial weights on both sides; AdamW ({cfg['adam_beta1']}, {cfg['adam_beta2']}), weight decay "
         f"{cfg['weight_decay']}, clip {cfg['clip_grad']}, lr {cfg['lr']:g} constant"),
        (f"- timing: mean over {cfg['timed_iters']} iterations after {cfg['warmup_iters']} warm-up "
         f"iterations; {results['flops_per_token'] / 1e9:.3f} GFLOP per token for both (megafast.planner."
         "training_flops_per_token: 3 x forward, causal attention halved, no recompute); MFU against "
         f"{results['peak_tflops']:.3g} TFLOP/s; memory is torch.cuda.max_memory_allocated, GB = 10^9 bytes"),
        (f"- megafast: pretrain_gpt.py's trainer (setup + train) in one process, {impl_m.get('backend')} "
         f"backend, {impl_m.get('params_dtype')} weights with {masters}; kernels {kernels.get('ops')}, "
         f"RoPE {kernels.get('rope')}, attention {kernels.get('attention')}, loss "
         f"{kernels.get('loss', 'n/a')}; {impl_m.get('optimizer')}"),
        (f"- baseline: transformers LlamaForCausalLM, attention {impl_h.get('attention')}, fp32 weights, "
         f"autocast {impl_h.get('autocast') or 'off'}, F.cross_entropy on float logits, "
         f"{impl_h.get('optimizer')}, clip_grad_norm_"),
        f"- command: `{env['command']}`",
    ]


def _table_lines(results: dict) -> list[str]:
    """One row per side, then megafast / baseline."""
    sides, r = results["sides"], results.get("ratios", {})
    columns = ["step s (min-max)", "tokens/s", "TFLOP/s per GPU", "MFU", "peak memory GB",
               "first-iteration loss"]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, key in (("megafast", "megafast"), ("PyTorch + transformers", "hf")):
        side = sides.get(key)
        if not side:
            continue
        if side.get("error"):
            first = _f(side.get("first_loss"), ".6f")
            lines.append(f"| {label} | failed: {side['error'][:200]} ||||| {first} |")
            continue
        mfu = side.get("mfu")
        lines.append(
            f"| {label} | {_f(side.get('step_time_s'), '.3f')} ({_f(side.get('step_time_min_s'), '.3f')}-"
            f"{_f(side.get('step_time_max_s'), '.3f')}) | {_f(side.get('tokens_per_s'), ',.0f')} | "
            f"{_f(side.get('tflops_per_gpu'), '.1f')} | {_f(mfu and 100 * mfu, '.1f')}% | "
            f"{_f(side.get('peak_memory_gb'), '.1f')} | {_f(side.get('first_loss'), '.6f')} |")
    lines.append(f"| megafast / baseline | | {_x(r.get('tokens_per_s'))} | {_x(r.get('tflops_per_gpu'))} | "
                 f"{_x(r.get('mfu'))} | {_x(r.get('peak_memory_gb'))} | "
                 f"rel. diff {_f(r.get('first_loss_rel_diff'), '.1e')} |")
    if r.get("loss_max_rel_diff") is not None:
        n = len(sides.get("megafast", {}).get("losses", []))
        lines += ["", (f"Losses of all {n} iterations: largest relative difference "
                       f"{r['loss_max_rel_diff']:.1e} (same initial weights, batches and recipe).")]
    return lines


def _planner_lines(p: dict) -> list[str]:
    """Predicted step time and memory of the megafast run vs the measured ones."""
    t, m, cluster = p["predicted_step"], p["predicted_memory_gb"], p["cluster"]
    return [
        (f"Planner (megafast.planner.throughput.step_time, compute efficiency "
         f"{cluster['compute_efficiency']:g} of {cluster['gpu_tflops']:g} TFLOP/s, HBM "
         f"{cluster['hbm_gbps']:g} GB/s): predicted step {p['predicted_step_time_s']:.3f} s (compute "
         f"{t['compute']:.3f}, optimizer {t['optimizer']:.3f}) vs measured "
         f"{_f(p.get('measured_step_time_s'), '.3f')} s: measured / predicted = "
         f"{_f(p.get('measured_over_predicted'), '.2f')}; the compute efficiency that would make it exact: "
         f"{_f(p.get('implied_compute_efficiency'), '.2f')}."),
        "",
        (f"Memory (megafast.planner.memory.peak_memory): weights {m['weights']:.2f} + gradients "
         f"{m['gradients']:.2f} + master weights {m['master_weights']:.2f} + optimizer states "
         f"{m['optimizer_states']:.2f} + activations {m['activations']:.2f} = {m['total']:.2f} GB predicted "
         f"vs {_f(p.get('measured_peak_memory_gb'), '.2f')} GB measured peak; model state "
         f"{p['predicted_static_gb']:.2f} GB predicted vs {_f(p.get('measured_after_training_gb'), '.2f')} "
         "GB allocated after training."),
    ]


def render_markdown(results: dict) -> str:
    """The docs/benchmarks.md section (also bench_train.md)."""
    lines = [*_header_lines(results), "", *_table_lines(results)]
    planner = results.get("planner")
    if planner and "error" in planner:
        lines += ["", f"Planner comparison failed: {planner['error']}"]
    elif planner:
        lines += ["", *_planner_lines(planner)]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def save(results: dict, out: str) -> None:
    results["ratios"] = ratios(results)
    for name, text in (("bench_train.json", json.dumps(results, indent=1)),
                       ("bench_train.md", render_markdown(results))):
        atomic_write(os.path.join(out, name), lambda f, text=text: f.write(text.encode("utf-8")))


# -------------------------------------------------------------------------------------- main


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("model (default: Llama-3.2-1B shape)")
    g.add_argument("--num-layers", type=int, default=16)
    g.add_argument("--hidden-size", type=int, default=2048)
    g.add_argument("--ffn-hidden-size", type=int, default=8192)
    g.add_argument("--num-attention-heads", type=int, default=32)
    g.add_argument("--num-query-groups", type=int, default=8)
    g.add_argument("--vocab-size", type=int, default=128256)
    g.add_argument("--rotary-base", type=float, default=500000.0)
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--untie-embeddings", action="store_true", help="default: tied, as Llama-3.2-1B")
    g.add_argument("--label", default=None,
                   help="model name in the doc's heading (default: 'Llama-3.2-1B shape' for the default "
                        "model)")
    g = p.add_argument_group("run")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--warmup-iters", type=int, default=5)
    g.add_argument("--timed-iters", type=int, default=20)
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default cuda when available")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--sides", default="megafast,hf", help="comma-separated subset of megafast,hf")
    g.add_argument("--no-share-weights", action="store_true",
                   help="baseline from HF's own initialisation instead of megafast's weights")
    g.add_argument("--megafast-args", default="",
                   help="extra pretrain_gpt.py flags, e.g. '--fused-linear-cross-entropy'")
    g.add_argument("--gpu-peak-tflops", type=float, default=None,
                   help="MFU denominator (default: megafast.planner.device_peak_tflops)")
    g.add_argument("--compute-efficiency", type=float, default=0.6,
                   help="planner's sustained fraction of peak")
    g.add_argument("--hbm-gbps", type=float, default=None, help="planner's HBM bandwidth (default by device)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.environ.get("OUT") or "bench_results")
    g.add_argument("--write-doc", default=None, help="put the section into this markdown file")
    g.add_argument("--from-json", default=None, help="render an earlier bench_train.json; run nothing")
    g.add_argument("--note", default="", help="a line added under the section")
    a = p.parse_args(argv)
    if unknown := set(a.sides.split(",")) - {"megafast", "hf"}:
        p.error(f"unknown --sides {sorted(unknown)}: choose from megafast,hf")
    if a.label is None:
        model = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "rotary_base", "norm_epsilon", "untie_embeddings")
        default = all(getattr(a, k) == p.get_default(k) for k in model)
        a.label = "Llama-3.2-1B shape" if default else "Llama-style model"
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse(argv)
    if a.from_json:
        with open(a.from_json, encoding="utf-8") as f:
            results = json.load(f)
        results["note"] = a.note or results.get("note", "")
        if a.write_doc:
            write_section(a.write_doc, SECTION, render_markdown(results))
        print(render_markdown(results))
        return 0
    if "megafast" in a.sides.split(","):
        try:
            import megafast.training.trainer  # noqa: F401 - needs megafast._C (the dataset helpers)
        except ImportError as e:
            raise SystemExit(f"error: cannot import megafast's trainer ({e}): build the extension first with "
                             "`pip install --no-build-isolation --no-deps -e .`") from None
    setup = build_setup(a)
    env = environment(setup)
    results: dict[str, Any] = {"environment": env, "config": config_record(setup, a.label),
                               "flops_per_token": setup.flops_per_token, "peak_tflops": setup.peak_tflops,
                               "sides": {}, "note": a.note}
    print(json.dumps(env), flush=True)
    sides = a.sides.split(",")
    weights = None
    if "megafast" in sides:
        free_device_memory(setup.device)
        results["sides"]["megafast"], weights = run_megafast(setup)
        try:
            results["planner"] = planner_comparison(setup, env["device"], results["sides"]["megafast"],
                                                    a.compute_efficiency, a.hbm_gbps)
        except Exception as e:  # noqa: BLE001 - the baseline still runs
            traceback.print_exc()
            results["planner"] = {"error": repr(e)}
        save(results, a.out)
    if "hf" in sides:
        free_device_memory(setup.device)
        results["sides"]["hf"] = run_hf(setup, None if a.no_share_weights else weights)
        save(results, a.out)
    text = render_markdown(results)
    print(text)
    if a.write_doc:
        write_section(a.write_doc, SECTION, text)
        print(f"wrote {a.write_doc}", file=sys.stderr)
    failed = [name for name, side in results["sides"].items() if side.get("error")]
    if failed:
        print(f"error: {', '.join(failed)} failed (recorded in {a.out}/bench_train.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
