"""Cost model shared by the trainer's TFLOP/s and MFU figures and by tools/plan.py.

Training FLOPs per token (forward 1x, backward 2x, full recompute one more forward):

    matmul   = 2 * (qkv + proj + fc1 + fc2 weights) per layer  +  2 * h * V (output layer)
    attention = 2 * 2 * s * H * d per layer, halved by the causal mask (QK^T and PV over the
                positions before each token: on average s/2 of them)
    train    = (3 + recompute) * forward
"""

from __future__ import annotations

import time
import torch

from megafast.config import GPTConfig

# Dense bf16 peak of known accelerators, TFLOP/s (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def matmul_params_per_layer(c: GPTConfig) -> int:
    fc1_rows = c.ffn_hidden_size * (2 if c.activation == "swiglu" else 1)
    return c.hidden_size * (c.qkv_size + c.num_attention_heads * c.head_dim + fc1_rows) + c.ffn_hidden_size * c.hidden_size


def forward_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    matmul = 2.0 * (c.num_layers * matmul_params_per_layer(c) + c.hidden_size * c.vocab_size)
    attention = c.num_layers * 2.0 * 2.0 * seq_length * c.num_attention_heads * c.head_dim / 2.0
    return matmul + attention


def training_flops_per_token(c: GPTConfig, seq_length: int) -> float:
    recompute = 1.0 if c.recompute_granularity == "full" else 0.0
    return (3.0 + recompute) * forward_flops_per_token(c, seq_length)


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak TFLOP/s for MFU: the vendor figure of a known GPU, else a quick matmul measurement."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_TFLOPS.items():
            if key in name:
                return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
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
