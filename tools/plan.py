"""Plan a run before spending GPU hours: will it fit, which layout, how fast, how many days.

    python tools/plan.py --num-layers 80 --hidden-size 8192 --num-attention-heads 64 \\
        --group-query-attention --num-query-groups 8 --ffn-hidden-size 28672 --swiglu \\
        --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \\
        --untie-embeddings-and-output-weights --vocab-size 128256 --seq-length 4096 \\
        --global-batch-size 1024 --num-gpus 64 --gpu-memory-gb 80 --tokens 2T

    python tools/plan.py --hf-config llama/config.json --seq-length 4096 --num-gpus 64 --json

    python tools/plan.py --hf-config llama/config.json --seq-length 4096

The model comes from Megatron's flags (pretrain_gpt.py's names) or from a Hugging Face
``config.json`` (Llama, Mistral, Qwen2, GPT-2). Without ``--num-gpus`` the answer is the model
itself: its size, the memory of each module (weights, fp32 gradients, master weights and
optimizer states) and the memory per GPU of each TP x PP x recompute strategy (at DP 1, which
the distributed optimizer would divide the master weights and optimizer states by). With
``--num-gpus``, every (TP, PP, DP, micro-batch, recompute,
distributed optimizer) layout of ``--num-gpus`` GPUs is estimated with megafast.planner (the
FLOP model the trainer logs MFU with, exact parameter/gradient/optimizer bytes, activations as
the model code keeps them, and a compute + communication time model); the layouts that fit are
ranked by tokens/s. Layout flags that are given (``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--recompute-granularity``, ``--use-distributed-optimizer``, ...) fix
that choice instead of searching it. ``--show-rejected`` lists every layout that does not fit
and why; ``--json`` prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import NamedTuple, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megafast.config import GPTConfig, LoRAConfig, QLoRAConfig  # noqa: E402
from megafast.planner import (  # noqa: E402
    GB,
    Cluster,
    Estimate,
    Layout,
    ModuleMemory,
    Plan,
    RankMemory,
    context_parallel_cost,
    longest_sequence,
    module_memory,
    peak_memory,
    search,
    total_parameter_count,
    training_flops_per_token,
)
from megafast.planner.layout import SHARDING_STRATEGIES  # noqa: E402
from megafast.planner.memory import strategy_table  # noqa: E402
from megafast.planner.qlora import qlora_memory  # noqa: E402
from megafast.planner.search import STRATEGY_NAMES, explain  # noqa: E402

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def token_count(text: str) -> float:
    """``2e12``, ``2T``, ``300B`` -> tokens."""
    scale = SUFFIXES.get(text[-1:].upper(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tokens {text!r} is not a number such as 2e12, 2T or 300B"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--tokens must be > 0, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    g = p.add_argument_group("model (Megatron flags, or --hf-config)")
    g.add_argument(
        "--hf-config", default=None, help="a Hugging Face config.json (llama, mistral, qwen2, gpt2)"
    )
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument(
        "--position-embedding-type", choices=["learned_absolute", "rope", "none"], default="learned_absolute"
    )
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument(
        "--hidden-dropout", type=float, default=None, help="default 0.1 (Megatron), 0 with --hf-config"
    )
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--num-experts", type=int, default=None, help="MoE: routed experts per MoE layer")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="default --ffn-hidden-size")

    g = p.add_argument_group("training")
    g.add_argument(
        "--seq-length", type=int, default=None, help="default: the HF config's max_position_embeddings"
    )
    g.add_argument("--global-batch-size", type=int, default=1024, help="sequences per step (default 1024)")
    g.add_argument(
        "--tokens", type=token_count, default=None, help="training tokens (2e12, 2T, 300B): adds days"
    )
    precision = g.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16",
        dest="dtype",
        action="store_const",
        const="bf16",
        default="bf16",
        help="bf16 parameters, fp32 master weights (default)",
    )
    precision.add_argument("--fp16", dest="dtype", action="store_const", const="fp16")
    precision.add_argument(
        "--fp32",
        dest="dtype",
        action="store_const",
        const="fp32",
        help="fp32 training (pretrain_gpt.py without --bf16/--fp16)",
    )
    g.add_argument("--optimizer", choices=["adam", "lion"], default="adam")
    g.add_argument("--fused-linear-cross-entropy", action="store_true",
                   help="the output layer + loss fused (pretrain_gpt.py's flag): no [tokens, vocab] "
                        "logits kept")

    g = p.add_argument_group("layout (each one given is fixed, else searched)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--micro-batch-size", type=int, default=None, help="default: search 1, 2, 4, 8")
    g.add_argument("--recompute-granularity", choices=["full", "selective", "none"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform",
                   help="for full recompute (pretrain_gpt.py's meaning)")
    g.add_argument("--recompute-num-layers", type=int, default=1, help="for full recompute")
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        default=None,
        help="fix ZeRO-1 sharding on (default: try with and without)",
    )
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false")
    g.add_argument("--data-parallel-sharding-strategy", choices=list(SHARDING_STRATEGIES), default=None,
                   help="fix the DP sharding (default: try all; the model report shows them side by side)")
    g.add_argument("--no-optimizer-cpu-offload", dest="optimizer_cpu_offload", action="store_false",
                   help="do not retry layouts that do not fit with the optimizer offloaded to the CPU")
    g.add_argument("--data-parallel-size", type=int, default=8,
                   help="DP size of the model report's per-strategy table (without --num-gpus)")
    g.add_argument(
        "--sequence-parallel", action="store_true", default=None, help="default: on whenever TP > 1"
    )
    g.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="with --max-seq-length-search: ranks each sequence is split over")
    g.add_argument("--cp-comm-type", choices=["p2p", "a2a"], default="p2p")
    g.add_argument("--expert-model-parallel-size", type=int, default=None,
                   help="MoE: EP (a divisor of DP and of the experts); default: searched")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall")
    g.add_argument("--max-seq-length-search", action="store_true",
                   help="print the longest --seq-length that fits --gpu-memory-gb on every GPU under the "
                        "given layout (TP, PP, CP, micro-batch, recompute, distributed optimizer; unset "
                        "ones: 1, 1, 1, 1, none, off; DP from --num-gpus) and exit")

    g = p.add_argument_group("QLoRA row (fine-tuning: NF4 base + LoRA adapters, megafast.planner.qlora)")
    g.add_argument("--lora-rank", type=int, default=16, help="adapter rank of the QLoRA row")
    g.add_argument("--qlora-double-quant", action="store_true", help="the QLoRA row with 8-bit block scales")

    g = p.add_argument_group("cluster")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="search the layouts of this many GPUs (throughput, days); without it: model "
                        "size and memory per module and per GPU for each TP x PP strategy")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu-memory-gb", type=float, default=80.0)
    g.add_argument(
        "--gpu-tflops",
        "--gpu-peak-tflops",
        dest="gpu_tflops",
        type=float,
        default=989.0,
        help="dense peak per GPU in the training dtype, TFLOP/s (default 989: H100 bf16)",
    )
    g.add_argument(
        "--intra-node-gbps",
        type=float,
        default=450.0,
        help="GB/s per GPU inside a node, one direction (default 450: NVLink 4)",
    )
    g.add_argument(
        "--inter-node-gbps",
        type=float,
        default=50.0,
        help="GB/s per GPU between nodes (default 50: one 400 Gb/s NIC per GPU)",
    )
    g.add_argument(
        "--gpu-hbm-gbps", type=float, default=3350.0, help="device memory GB/s (default 3350: H100)"
    )
    g.add_argument(
        "--compute-efficiency", type=float, default=0.6, help="fraction of peak the model sustains"
    )
    g.add_argument(
        "--comm-efficiency", type=float, default=0.8, help="fraction of link bandwidth collectives reach"
    )
    g.add_argument(
        "--memory-headroom",
        type=float,
        default=0.1,
        help="fraction of GPU memory kept free (CUDA context, NCCL, fragmentation)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="one JSON object on stdout")
    g.add_argument(
        "--top", type=int, default=20, help="feasible layouts shown (default 20; --json lists all)"
    )
    g.add_argument("--show-rejected", action="store_true", help="list the layouts that do not fit, and why")
    return p.parse_args(argv)


def config_from_hf(hf: dict) -> GPTConfig:
    """The GPTConfig of a Hugging Face config.json dict (Llama, Mistral, Qwen2 or GPT-2)."""
    kind = hf.get("model_type")
    if kind in ("mixtral", "qwen2_moe", "qwen3_moe"):  # the converter's reading of the MoE families
        from megafast.convert import hf_moe

        arch = next(a for a, k in hf_moe.ARCHITECTURES.items() if k == kind)
        return hf_moe.config_from_hf(hf, arch, 128, "--hf-config")[0]
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {act!r} is not supported: megafast has gelu and tanh-gelu")
        return GPTConfig(
            num_layers=hf["n_layer"],
            hidden_size=hf["n_embd"],
            num_attention_heads=hf["n_head"],
            vocab_size=hf["vocab_size"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_position_embeddings=hf["n_positions"],
            norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation="gelu" if act == "gelu" else "gelu_tanh",
            hidden_dropout=hf.get("resid_pdrop", 0.0),
            attention_dropout=hf.get("attn_pdrop", 0.0),
            tie_embeddings=True,
        )
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(
            f"--hf-config model_type {kind!r} is not supported: use llama, mistral, qwen2 or gpt2"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"hidden_act {hf['hidden_act']!r} is not supported: megafast's Llama MLP is SwiGLU (silu)"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(
            "attention_bias/mlp_bias are not supported: megafast has biases on all linears or on QKV only"
        )
    rope = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return GPTConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim"),
        max_position_embeddings=hf["max_position_embeddings"],
        position_embedding_type="rope",
        rotary_base=rope,
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        add_bias_linear=False,
        add_qkv_bias=kind == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_dropout=hf.get("attention_dropout", 0.0),
        hidden_dropout=0.0,
    )


def model_from_args(args: argparse.Namespace) -> tuple[GPTConfig, int]:
    """(model, sequence length) from --hf-config or the Megatron flags."""
    if args.hf_config:
        try:
            with open(args.hf_config) as f:
                hf = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read --hf-config {args.hf_config}: {e}") from None
        try:
            config = config_from_hf(hf)
        except KeyError as e:
            raise SystemExit(
                f"error: --hf-config {args.hf_config} has no {e} entry: is it a model config.json?"
            ) from None
        config = dataclasses.replace(
            config,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            fused_linear_cross_entropy=args.fused_linear_cross_entropy,
            hidden_dropout=config.hidden_dropout if args.hidden_dropout is None else args.hidden_dropout,
        )
        return config, args.seq_length or config.max_position_embeddings
    missing = [
        f
        for f in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")
        if getattr(args, f) is None
    ]
    if missing:
        raise SystemExit(
            "error: give --hf-config, or the model flags "
            + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    config = GPTConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        position_embedding_type=args.position_embedding_type,
        normalization=args.normalization,
        activation="swiglu" if args.swiglu else "gelu",
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        hidden_dropout=0.1 if args.hidden_dropout is None else args.hidden_dropout,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        fused_linear_cross_entropy=args.fused_linear_cross_entropy,
        num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
    )
    return config, args.seq_length


def make_plan(args: argparse.Namespace, config: GPTConfig, seq_length: int, cluster: Cluster) -> Plan:
    rc = args.recompute_granularity
    return search(
        config,
        cluster,
        seq_length,
        args.global_batch_size,
        dtype=args.dtype,
        optimizer=args.optimizer,
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        micro_batch_sizes=[args.micro_batch_size] if args.micro_batch_size else (1, 2, 4, 8),
        recompute=(None, "selective", "full") if rc is None else [None if rc == "none" else rc],
        distributed_optimizer=(False, True)
        if args.use_distributed_optimizer is None
        else [args.use_distributed_optimizer],
        sharding_strategies=None if args.data_parallel_sharding_strategy is None
        else [args.data_parallel_sharding_strategy],
        offload=args.optimizer_cpu_offload,
        sequence_parallel=args.sequence_parallel,
        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        ep=args.expert_model_parallel_size,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
    )


def estimate_dict(est: Estimate, tokens: Optional[float]) -> dict:
    layout = dataclasses.asdict(est.layout)
    out: dict = {"layout": layout, "fits": est.fits, "reason": est.reason}
    if est.memory is not None:
        out["memory_gb"] = est.memory.breakdown_gb()
        out["memory_pp_rank"] = est.memory.pp_rank
    if est.time is not None:
        out["step_time_s"] = dataclasses.asdict(est.time) | {"total": est.time.total}
        out["tokens_per_s"] = est.tokens_per_s
        out["tflops_per_gpu"] = est.tflops_per_gpu
        out["mfu"] = est.mfu
    if tokens is not None and est.time is not None:
        out["days"] = est.days(tokens)
    return out


def _zero(layout: Layout) -> str:
    """ZeRO stage (0: no_shard ... 3: optim_grads_params), "+off" with optimizer CPU offload."""
    return f"{layout.zero_stage}" + ("+off" if layout.optimizer_offload_fraction else "")


def sharding_rows(args: argparse.Namespace, config: GPTConfig, seq_length: int) -> tuple[Layout, dict]:
    """Model state per GPU under each DP sharding strategy (and ZeRO-3 with the optimizer offloaded)
    at TP/PP from the flags (default 1) and DP --data-parallel-size."""
    layout = Layout(tp=args.tensor_model_parallel_size or 1, pp=args.pipeline_model_parallel_size or 1,
                    dp=args.data_parallel_size, seq_length=seq_length, dtype=args.dtype, optimizer=args.optimizer)
    layout.check(config)
    table = strategy_table(config, layout)
    rows = {k: {"weights": m.weights / GB, "gradients": m.gradients / GB, "master_weights":
                m.master_weights / GB, "optimizer_states": m.optimizer_states / GB, "host": m.host / GB,
                "total": m.total / GB} for k, m in table.items()}
    q = qlora_row(args, config, layout)
    rows["qlora"] = {"weights": (q.base_nf4 + q.frozen + q.adapters) / GB, "gradients": q.gradients / GB,
                     "master_weights": q.master_weights / GB, "optimizer_states": q.optimizer_states / GB,
                     "host": 0.0, "total": q.total / GB}
    return layout, rows


def qlora_row(args: argparse.Namespace, config: GPTConfig, layout: Layout):
    """Model state per GPU of a QLoRA fine-tune (--lora-rank, --qlora-double-quant) at ``layout``."""
    if args.lora_rank < 1:
        raise SystemExit(f"error: --lora-rank must be >= 1, got {args.lora_rank}")
    lora, qlora = LoRAConfig(rank=args.lora_rank), QLoRAConfig(double_quant=args.qlora_double_quant)
    return qlora_memory(config, layout, lora, qlora)


def qlora_explanation(args: argparse.Namespace, config: GPTConfig, plan: Plan, usable_gb: float) -> str:
    """Where QLoRA stands against the chosen layout (it trains only adapters: fine-tuning, not
    pretraining, so the search never picks it for a full training run)."""
    name = f"QLoRA (NF4 base + rank-{args.lora_rank} adapters)"
    if plan.feasible:
        best = plan.feasible[0]
        q = qlora_row(args, config, best.layout)
        full = best.memory.static.total
        return (f"  {name}: {q.total / GB:.2f} GB of model state per GPU at this layout against {full / GB:.2f} GB; "
                "it trains adapters only (fine-tuning, not pretraining), so it is not a candidate here")
    q = qlora_row(args, config, Layout(dtype=args.dtype, optimizer=args.optimizer))
    verdict = "fits" if q.total / GB <= usable_gb else "does not fit"
    return (f"  {name}: no full-training layout fits; a QLoRA fine-tune holds {q.total / GB:.2f} GB of model "
            f"state on one GPU (TP 1 x PP 1, before activations), which {verdict} {usable_gb:.1f} GB usable")


def _recompute(layout: Layout) -> str:
    if layout.recompute != "full" or (layout.recompute_method, layout.recompute_num_layers) == ("uniform", 1):
        return layout.recompute or "-"
    return f"full ({layout.recompute_method} {layout.recompute_num_layers})"


def _print_model_line(console, args: argparse.Namespace, config: GPTConfig, seq_length: int,
                      batch: str = "") -> None:
    """The first line of both reports: size, shape, FLOPs per token, sequence, precision."""
    params = total_parameter_count(config, padded=False)
    flops = training_flops_per_token(config, seq_length)
    console.print(
        f"[bold]model[/bold] {params / 1e9:.2f}B parameters ({params:,}), {config.num_layers} layers, "
        f"hidden {config.hidden_size}, {flops / 1e9:.1f} GFLOP/token (training); seq {seq_length}, "
        f"{batch}{args.dtype}, {args.optimizer}"
    )


def print_tables(
    plan: Plan, args: argparse.Namespace, config: GPTConfig, seq_length: int, cluster: Cluster
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    _print_model_line(console, args, config, seq_length, f"global batch {args.global_batch_size}, ")
    console.print(
        f"[bold]cluster[/bold] {cluster.num_gpus} GPUs ({cluster.gpus_per_node}/node), "
        f"{cluster.gpu_memory_gb:g} GB, {cluster.gpu_tflops:g} TFLOP/s peak "
        f"x {cluster.compute_efficiency:g}, "
        f"links {cluster.intra_node_gbps:g}/{cluster.inter_node_gbps:g} GB/s x {cluster.comm_efficiency:g}"
    )
    table = Table(title=f"{len(plan.feasible)} layouts fit, fastest first")
    for col in (
        "#",
        "TP",
        "PP",
        "DP",
        "EP",
        "VP",
        "MBS",
        "M",
        "SP",
        "recompute",
        "dist-opt",
        "ZeRO",
        "GB/GPU",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "step s",
        "bubble",
    ):
        table.add_column(col, justify="right")
    if args.tokens:
        table.add_column("days", justify="right")
    for i, est in enumerate(plan.feasible[: args.top], 1):
        lay, t = est.layout, est.time
        row = [
            str(i),
            str(lay.tp),
            str(lay.pp),
            str(lay.dp),
            str(lay.ep),
            str(lay.num_model_chunks),
            str(lay.micro_batch_size),
            str(lay.num_microbatches),
            "y" if lay.sequence_parallel else "-",
            _recompute(lay),
            "y" if lay.distributed_optimizer else "-",
            _zero(lay),
            f"{est.memory.total / GB:.1f}",
            f"{est.tokens_per_s:,.0f}",
            f"{est.tflops_per_gpu:.0f}",
            f"{est.mfu:.1%}",
            f"{t.total:.2f}",
            f"{t.bubble / t.total:.0%}",
        ]
        if args.tokens:
            row.append(f"{est.days(args.tokens):.1f}")
        table.add_row(*row)
    console.print(table)
    for line in explain(plan, cluster.usable_memory_bytes / GB):
        console.print(line)
    console.print(qlora_explanation(args, config, plan, cluster.usable_memory_bytes / GB))
    if not plan.feasible:
        console.print("[bold red]no layout fits[/bold red]: the closest ones are listed below")
    if args.show_rejected or not plan.feasible:
        rejected = (
            plan.rejected
            if args.show_rejected
            else sorted((r for r in plan.rejected if r.memory is not None), key=lambda r: r.memory.total)[:10]
        )
        table = Table(title=f"{len(rejected)} rejected layouts")
        for col in ("TP", "PP", "DP", "MBS", "recompute", "dist-opt", "why not"):
            table.add_column(col, justify="left" if col == "why not" else "right")
        for est in rejected:
            lay = est.layout
            table.add_row(
                str(lay.tp),
                str(lay.pp),
                str(lay.dp),
                str(lay.micro_batch_size),
                _recompute(lay),
                "y" if lay.distributed_optimizer else "-",
                est.reason,
            )
        console.print(table)
    else:
        console.print(f"{len(plan.rejected)} layouts rejected (--show-rejected says why)")


class Strategy(NamedTuple):
    """One TP x PP x recompute layout at DP 1, and its most loaded GPU (None: it cannot run)."""

    layout: Layout
    memory: Optional[RankMemory]
    reason: Optional[str] = None  # why the layout cannot run


def strategies(args: argparse.Namespace, config: GPTConfig, seq_length: int) -> list[Strategy]:
    """Memory per GPU of each strategy: TP 1, 2, 4, 8 (up to --gpus-per-node) x PP 1, 2, 4, ...
    (up to the layers, at most 16) x no/selective/full recompute, unless a flag fixes one; one
    micro-batch of --micro-batch-size (default 1) sequences, 1F1B over the global batch."""
    tps = [args.tensor_model_parallel_size] if args.tensor_model_parallel_size else [
        t for t in (1, 2, 4, 8) if t <= args.gpus_per_node
    ]
    pps = [args.pipeline_model_parallel_size] if args.pipeline_model_parallel_size else [
        p for p in (1, 2, 4, 8, 16) if p <= config.num_layers
    ]
    rc = args.recompute_granularity
    recomputes = (None, "selective", "full") if rc is None else [None if rc == "none" else rc]
    mbs = args.micro_batch_size or 1
    out = []
    for t in tps:
        for p in pps:
            for r in recomputes:
                layout = Layout(
                    tp=t,
                    pp=p,
                    micro_batch_size=mbs,
                    num_microbatches=max(1, args.global_batch_size // mbs),
                    seq_length=seq_length,
                    sequence_parallel=(t > 1) if args.sequence_parallel is None else args.sequence_parallel,
                    recompute=r,
                    recompute_method=args.recompute_method,
                    recompute_num_layers=args.recompute_num_layers,
                    dtype=args.dtype,
                    optimizer=args.optimizer,
                )
                try:
                    layout.check(config)
                except ValueError as err:
                    out.append(Strategy(layout, None, str(err)))
                    continue
                out.append(Strategy(layout, peak_memory(config, layout)))
    return out


def module_dict(m: ModuleMemory) -> dict:
    s = m.static
    memory = {
        "weights": s.weights / GB,
        "gradients": s.gradients / GB,
        "master_weights": s.master_weights / GB,
        "optimizer_states": s.optimizer_states / GB,
        "total": s.total / GB,
    }
    return {"module": m.name, "count": m.count, "parameters": m.parameters, "memory_gb": memory}


def strategy_dict(s: Strategy, usable_gb: float) -> dict:
    out: dict = {"layout": dataclasses.asdict(s.layout), "reason": s.reason}
    if s.memory is not None:
        out["memory_gb"] = s.memory.breakdown_gb()
        out["memory_pp_rank"] = s.memory.pp_rank
        out["fits"] = s.memory.total / GB <= usable_gb
    return out


def print_model_tables(
    args: argparse.Namespace,
    config: GPTConfig,
    seq_length: int,
    modules: list[ModuleMemory],
    found: list[Strategy],
    usable_gb: float,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    _print_model_line(console, args, config, seq_length)
    table = Table(title="memory per module (unsharded; GB = 10^9 bytes)")
    for col in ("module", "x", "parameters", "weights", "gradients", "master", "optimizer", "total GB"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in modules:
        s = m.static
        table.add_row(m.name, str(m.count), f"{m.parameters:,}", *(
            f"{v / GB:.2f}" for v in (s.weights, s.gradients, s.master_weights, s.optimizer_states, s.total)
        ))
    total = sum(m.static.total for m in modules)
    table.add_row("all", "", f"{sum(m.parameters for m in modules):,}", "", "", "", "", f"{total / GB:.2f}")
    console.print(table)
    mbs = args.micro_batch_size or 1
    table = Table(
        title=f"memory per GPU (most loaded), DP 1, micro-batch {mbs} x {seq_length} tokens; "
        f"the distributed optimizer divides master + optimizer by DP; fits: <= {usable_gb:.1f} GB usable"
    )
    for col in ("TP", "PP", "SP", "recompute", "weights", "gradients", "master", "optimizer",
                "activations", "total GB", "fits"):
        table.add_column(col, justify="right")
    for s in found:
        if s.memory is None:
            continue
        b, lay = s.memory.breakdown_gb(), s.layout
        table.add_row(
            str(lay.tp),
            str(lay.pp),
            "y" if lay.sequence_parallel else "-",
            _recompute(lay),
            *(f"{b[k]:.2f}" for k in ("weights", "gradients", "master_weights", "optimizer_states", "activations")),
            f"{b['total']:.2f}",
            "y" if b["total"] <= usable_gb else "-",
        )
    console.print(table)
    layout, rows = sharding_rows(args, config, seq_length)
    table = Table(title=f"model state per GPU by DP sharding strategy, TP {layout.tp} x PP {layout.pp} x "
                        f"DP {layout.dp} (--data-parallel-size; GB, without activations; host = CPU memory)")
    for col in ("strategy", "weights", "gradients", "master", "optimizer", "host", "GPU total GB"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, r in rows.items():
        label = STRATEGY_NAMES.get(name, name.replace("optim_grads_params+offload", "ZeRO-3 + CPU offload"))
        if name == "qlora":
            label = f"QLoRA (NF4 base, LoRA rank {args.lora_rank}; fine-tuning)"
        table.add_row(label, *(f"{r[k]:.2f}" for k in ("weights", "gradients", "master_weights",
                                                       "optimizer_states", "host", "total")))
    console.print(table)
    console.print("--num-gpus N adds the layout search (throughput, MFU; days with --tokens)")


def model_report(args: argparse.Namespace, config: GPTConfig, seq_length: int) -> None:
    """The answer without --num-gpus: model size, memory per module and per GPU per strategy."""
    if args.tokens is not None:
        raise SystemExit("error: --tokens (days of training) needs --num-gpus: give the cluster size")
    if args.gpu_memory_gb <= 0 or not 0 <= args.memory_headroom < 1:
        raise SystemExit("error: --gpu-memory-gb must be > 0 and --memory-headroom in [0, 1)")
    usable_gb = args.gpu_memory_gb * (1 - args.memory_headroom)
    modules = module_memory(config, args.dtype, args.optimizer)
    found = strategies(args, config, seq_length)
    if args.json:
        out = {
            "model": dataclasses.asdict(config)
            | {
                "parameters": total_parameter_count(config, padded=False),
                "training_flops_per_token": training_flops_per_token(config, seq_length),
            },
            "seq_length": seq_length,
            "global_batch_size": args.global_batch_size,
            "dtype": args.dtype,
            "optimizer": args.optimizer,
            "gpu_memory_gb": args.gpu_memory_gb,
            "usable_memory_gb": usable_gb,
            "modules": [module_dict(m) for m in modules],
            "strategies": [strategy_dict(s, usable_gb) for s in found],
            "sharding": sharding_rows(args, config, seq_length)[1],
        }
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_model_tables(args, config, seq_length, modules, found, usable_gb)


def longest_sequence_report(args: argparse.Namespace) -> int:
    """``--max-seq-length-search``: the longest sequence that fits one GPU under the given layout."""
    try:
        config, _ = model_from_args(argparse.Namespace(**{**vars(args), "seq_length": args.seq_length or 1}))
        tp, pp = args.tensor_model_parallel_size or 1, args.pipeline_model_parallel_size or 1
        cp = args.context_parallel_size
        dp = (args.num_gpus or tp * pp * cp) // (tp * pp * cp)
        if dp < 1 or (args.num_gpus or tp * pp * cp) % (tp * pp * cp):
            raise ValueError(f"--num-gpus {args.num_gpus} is not a multiple of TP x PP x CP = {tp * pp * cp}")
        rc = None if args.recompute_granularity in (None, "none") else args.recompute_granularity
        layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, cp_comm_type=args.cp_comm_type,
                        micro_batch_size=args.micro_batch_size or 1, recompute=rc,
                        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
                        distributed_optimizer=bool(args.use_distributed_optimizer),
                        sequence_parallel=tp > 1 if args.sequence_parallel is None else args.sequence_parallel,
                        dtype=args.dtype, optimizer=args.optimizer)
        if args.position_embedding_type != "learned_absolute" or args.hf_config:
            config = dataclasses.replace(config, max_position_embeddings=1 << 24)
        budget = args.gpu_memory_gb * (1 - args.memory_headroom) * GB
        layout.check(config)
        longest = longest_sequence(config, layout, budget)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if longest is None:
        raise SystemExit(f"error: not even the shortest sequence fits {budget / GB:.1f} GB under this layout: "
                         "raise TP/PP/CP, recompute, or the GPU memory")
    memory = peak_memory(config, dataclasses.replace(layout, seq_length=longest))
    cost = context_parallel_cost(config, dataclasses.replace(layout, seq_length=longest))
    out = {"max_seq_length": longest, "peak_memory_gb": memory.total / GB, "usable_memory_gb": budget / GB,
           "layout": dataclasses.asdict(layout) | {"seq_length": longest},
           "cp_bytes_per_layer": {"forward": cost.forward_bytes, "backward": cost.backward_bytes}}
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"longest sequence: {longest:,} tokens (TP={tp}, PP={pp}, CP={cp} {args.cp_comm_type}, DP={dp}, "
              f"micro-batch {layout.micro_batch_size}, recompute {rc or 'none'}): {memory.total / GB:.1f} GB of "
              f"{budget / GB:.1f} GB usable per GPU; CP traffic per layer and micro-batch "
              f"{cost.forward_bytes / GB:.3f} GB forward, {cost.backward_bytes / GB:.3f} GB backward")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.max_seq_length_search:
        return longest_sequence_report(args)
    if args.num_gpus is None:
        config, seq_length = model_from_args(args)
        try:
            model_report(args, config, seq_length)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return 0
    try:
        config, seq_length = model_from_args(args)
        cluster = Cluster(
            args.num_gpus,
            args.gpus_per_node,
            args.gpu_memory_gb,
            args.gpu_tflops,
            args.intra_node_gbps,
            args.inter_node_gbps,
            args.gpu_hbm_gbps,
            args.compute_efficiency,
            args.comm_efficiency,
            args.memory_headroom,
        )
        plan = make_plan(args, config, seq_length, cluster)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        out = {
            "model": dataclasses.asdict(config)
            | {
                "parameters": total_parameter_count(config, padded=False),
                "training_flops_per_token": training_flops_per_token(config, seq_length),
            },
            "cluster": dataclasses.asdict(cluster),
            "seq_length": seq_length,
            "global_batch_size": args.global_batch_size,
            "tokens": args.tokens,
            "feasible": [estimate_dict(e, args.tokens) for e in plan.feasible],
            "rejected": [estimate_dict(e, args.tokens) for e in plan.rejected],
            "explanation": explain(plan, cluster.usable_memory_bytes / GB)
            + [qlora_explanation(args, config, plan, cluster.usable_memory_bytes / GB)],
        }
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_tables(plan, args, config, seq_length, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
