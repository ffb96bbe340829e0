"""How many FLOPs a token costs, and the peak FLOP/s of the device that MFU divides by.

FLOPs per token (2 per multiply-accumulate; s sequence length)::

    forward  = L * (2 * (qkv + proj + fc1 + fc2 weights) + attention) + 2 * h * V_padded
    attention = 2 * 2 * s * H * d / 2   (QK^T and PV; the causal mask halves them: on average a
                                         token attends to s/2 positions, as flash attention skips
                                         the masked blocks)
    training = 3 * forward              (backward = 2 * forward: input and weight gradients)

An MoE layer's fc1 + fc2 are replaced by what a token multiplies through: the router (h E),
its top-k experts (k (F_1 + F) h), the shared experts, and the weighted combine of the k expert
outputs (k h multiply-adds: the permutation kernel's batched matmul); so MoE FLOPs count *active*
parameters.

The trainer's TFLOP/s and MFU use :func:`training_flops_per_token` (model FLOPs, as Megatron-LM
reports them: recomputation is not counted, so MFU does not reward recomputing). The step-time
model counts what the device really executes (``include_recompute=True``): full recompute adds
one forward of every recomputed transformer layer (all of them with the uniform method, the first
N of each model chunk with block), selective recompute one forward of the attention core.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from megafast.config import GPTConfig
from megafast.model.recompute import recomputed_layers

# Dense bf16 peak of known accelerators, TFLOP/s (vendor figures, no sparsity). Matched against
# torch.cuda.get_device_name in order, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


def matmul_params_per_layer(c: GPTConfig, layer: int = 0) -> int:
    """Weights a token multiplies through in layer ``layer``: qkv + proj + fc1 + fc2 (unsharded);
    an MoE layer: qkv + proj + router + top-k experts + shared experts."""
    fc1_rows = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1)
    if c.is_moe_layer(layer):
        glu = 2 if c.activation == "swiglu" else 1
        h, shared = c.hidden_size, c.moe_shared_expert_intermediate_size or 0
        return (
            h * (c.qkv_size + c.num_attention_heads * c.head_dim)
            + h * c.num_experts
            + c.moe_router_topk * (glu + 1) * c.moe_ffn_hidden_size * h
            + c.moe_router_topk * h  # combine: sum over the k choices of weight * expert output
            + (glu + 1) * shared * h
            + (h if c.moe_shared_expert_gate else 0)
        )
    return (
        c.hidden_size * (c.qkv_size + c.num_attention_heads * c.head_dim + fc1_rows)
        + c.ffn_hidden_size * c.hidden_size
    )


def attention_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    """Forward QK^T and PV of one layer, causal: 2 * 2 * s * H * d / 2."""
    return 2.0 * 2.0 * seq_length * c.num_attention_heads * c.head_dim / 2.0


def layer_forward_flops_per_token(c: GPTConfig, seq_length: int, layer: Optional[int] = None) -> float:
    """One layer's forward FLOPs per token; ``layer`` None: the mean over the layers (MoE interleaving)."""
    if layer is None:
        if not c.is_moe:
            layer = 0
        else:
            layers = range(c.num_layers)
            return sum(layer_forward_flops_per_token(c, seq_length, i) for i in layers) / c.num_layers
    return 2.0 * matmul_params_per_layer(c, layer) + attention_flops_per_token(c, seq_length)


def output_forward_flops_per_token(c: GPTConfig, tp_size: int = 1) -> float:
    """The output layer (logits), 2 * h * V_padded; padding columns are computed too."""
    return 2.0 * c.hidden_size * c.padded_vocab_size(tp_size)


def forward_flops_per_token(c: GPTConfig, seq_length: int, tp_size: int = 1) -> float:
    if c.is_moe:
        layers = sum(layer_forward_flops_per_token(c, seq_length, i) for i in range(c.num_layers))
        return layers + output_forward_flops_per_token(c, tp_size)
    return c.num_layers * layer_forward_flops_per_token(c, seq_length) + output_forward_flops_per_token(
        c, tp_size
    )


def recompute_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    """Extra forward work of recomputation, all layers in one model chunk: the recomputed layers
    (full) or every attention core (selective)."""
    if c.recompute_granularity == "full":
        return recomputed_layers(c, c.num_layers) * layer_forward_flops_per_token(c, seq_length)
    if c.recompute_granularity == "selective":
        return c.num_layers * attention_flops_per_token(c, seq_length)
    return 0.0


def training_flops_per_token(
    c: GPTConfig, seq_length: int, tp_size: int = 1, include_recompute: bool = False
) -> float:
    """Forward + backward FLOPs per token: 3 * forward (+ recomputation when asked).

    Without recomputation these are model FLOPs, the MFU numerator; with it, the work the
    device executes (hardware FLOPs), which the step-time model uses.
    """
    flops = 3.0 * forward_flops_per_token(c, seq_length, tp_size)
    return flops + (recompute_flops_per_token(c, seq_length) if include_recompute else 0.0)


def known_peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Vendor dense peak of a known GPU name (bf16/fp16; half of it for fp32/TF32), else None."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
    return None


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak TFLOP/s for MFU: the vendor figure of a known GPU, else a quick matmul measurement."""
    if device.type == "cuda":
        peak = known_peak_tflops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    n = 512
    g = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG streams untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    reps, start = 8, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start) / 1e12


__all__ = [
    "PEAK_BF16_TFLOPS",
    "attention_flops_per_token",
    "device_peak_tflops",
    "forward_flops_per_token",
    "known_peak_tflops",
    "layer_forward_flops_per_token",
    "matmul_params_per_layer",
    "output_forward_flops_per_token",
    "recompute_flops_per_token",
    "training_flops_per_token",
]
