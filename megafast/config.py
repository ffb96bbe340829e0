"""Small typed configs, one per component, each validated in ``__post_init__``.

Errors a user can cause are ``ValueError`` with one line naming the problem and the fix. Layout
checks that involve both the model and the parallel layout live in :func:`validate_layout` and run
before any process group is created.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Literal, Optional

Normalization = Literal["LayerNorm", "RMSNorm"]
PositionEmbedding = Literal["learned_absolute", "rope", "none"]
Activation = Literal["gelu", "gelu_tanh", "swiglu"]
Recompute = Optional[Literal["full", "selective"]]
RecomputeMethod = Literal["uniform", "block"]
KERNEL_BACKENDS = ("auto", "triton", "torch")  # --kernels (megafast.kernels.dispatch)
ROPE_BACKENDS = ("auto", "triton", "cuda", "torch")  # --rope-kernel; auto follows --kernels
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "triton")  # --attention-backend
ROPE_SCALING_TYPES = ("llama3", "linear", "yarn")  # --rope-scaling-type (megafast.model.rotary)
# GPTConfig fields of RoPE scaling, sliding window and q/k norm: flags of the same names
# (megafast.arguments), checkpoint args entries (GPTConfig's default when absent).
LONG_CONTEXT_FIELDS = (
    "use_rope_scaling", "rope_scaling_type", "rope_scaling_factor", "rope_scaling_low_freq_factor",
    "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_attention_factor",
    "yarn_correction_range_round_to_int", "window_size", "qk_layernorm",
)


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation the model's fused ops use (``megafast.kernels.dispatch`` applies it).

    Same field names as :class:`GPTConfig` (``--kernels``, ``--attention-backend``, ``--rope-kernel``).
    """

    kernels: str = "auto"  # auto | triton | torch: norms, RoPE, activations, cross-entropy
    attention_backend: str = "auto"  # auto | flash | sdpa | triton
    rope_kernel: str = "auto"  # auto (= kernels) | triton | cuda | torch

    def __post_init__(self) -> None:
        for flag, value, choices in (
            ("--kernels", self.kernels, KERNEL_BACKENDS),
            ("--attention-backend", self.attention_backend, ATTENTION_BACKENDS),
            ("--rope-kernel", self.rope_kernel, ROPE_BACKENDS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")
        if self.attention_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "--attention-backend flash needs the flash-attn package: install it or use auto/sdpa/triton"
            )

    @property
    def rope_backend(self) -> str:
        """The RoPE implementation: ``rope_kernel``, or ``kernels`` when it is auto."""
        return self.kernels if self.rope_kernel == "auto" else self.rope_kernel


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT-2 or Llama-family decoder (Megatron-core's names where they exist).

    Frozen (hashable: the planner's caches key on it); derive variants with ``dataclasses.replace``.

    GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings (the defaults).
    Llama: ``position_embedding_type="rope"``, ``normalization="RMSNorm"``, ``activation="swiglu"``,
    ``add_bias_linear=False``, ``num_query_groups`` < heads for GQA; Qwen2 adds ``add_qkv_bias``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden
    num_query_groups: Optional[int] = None  # default = num_attention_heads (no GQA)
    kv_channels: Optional[int] = None  # head dim; default hidden / heads
    max_position_embeddings: int = 2048
    position_embedding_type: PositionEmbedding = "learned_absolute"
    rotary_base: float = 10000.0
    normalization: Normalization = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: Activation = "gelu"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # Qwen2: bias on linear_qkv only (implied by add_bias_linear)
    tie_embeddings: bool = True  # share embedding.word_embeddings.weight with the output layer
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    recompute_granularity: Recompute = None
    # Full recompute (Megatron's --recompute-method/--recompute-num-layers, per model chunk):
    # uniform checkpoints groups of N consecutive layers (only each group's input is kept), block
    # checkpoints the first N layers one by one and keeps the others' activations.
    # Ignored unless recompute_granularity == "full"; see megafast.model.recompute.
    recompute_method: Optional[RecomputeMethod] = None  # default uniform
    recompute_num_layers: Optional[int] = None  # default 1
    # Fused-op implementations (megafast.kernels.dispatch). auto: Triton on CUDA, torch on CPU;
    # attention auto: flash-attn when importable on CUDA fp16/bf16, else torch SDPA.
    kernels: str = "auto"
    rope_kernel: str = "auto"
    attention_backend: str = "auto"
    # Output layer + loss by megafast.kernels.fused_linear_cross_entropy (chunked over tokens,
    # never holding the [tokens, V/p] logits; Triton under ``kernels``, else the unfused torch ops).
    fused_linear_cross_entropy: bool = False
    # Mixture of experts (Megatron-core's names; megafast.model.moe). None: a dense model.
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # each expert's FFN size; default ffn_hidden_size
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_grouped_gemm: bool = False  # experts as one grouped GEMM (megafast.kernels), else a per-expert loop
    moe_shared_expert_intermediate_size: Optional[int] = None  # shared experts' total FFN size
    moe_shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(x . gate_weight)
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (no renormalisation)
    moe_expert_capacity_factor: Optional[float] = None  # None: dropless
    moe_layer_freq: int | tuple[int, ...] = 1  # every Nth layer is MoE, or a 0/1 pattern per layer
    # how tokens reach the experts of other expert-parallel ranks (megafast.model.moe; EP > 1 only)
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    # Long context (megafast.model.rotary, megafast.model.sliding_window). RoPE scaling, Megatron's
    # --use-rope-scaling --rope-scaling-factor (llama3 by default) plus --rope-scaling-type:
    # llama3 (Llama 3.1+), linear (positions / factor), yarn (with its attention factor on cos/sin).
    use_rope_scaling: bool = False
    rope_scaling_type: str = "llama3"
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0  # llama3
    rope_scaling_high_freq_factor: float = 4.0  # llama3
    rope_scaling_original_max_position_embeddings: int = 8192  # llama3 and yarn: the pretraining context
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_attention_factor: Optional[float] = None  # default from factor (and mscale, mscale_all_dim)
    yarn_correction_range_round_to_int: bool = True  # HF's "truncate"
    # Sliding-window attention (Megatron's --window-size, flash-attn's (left, right)): query i sees
    # keys j with i - left <= j <= i. HF's sliding_window W is (W - 1, 0). None: full causal.
    window_size: Optional[tuple[int, int]] = None
    qk_layernorm: bool = False  # per-head norm of q and k before RoPE (Qwen3; --qk-layernorm)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} "
                    "attention heads: choose --num-attention-heads dividing --hidden-size (or set --kv-channels)"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{self.num_attention_heads} attention heads are not divisible by {self.num_query_groups} "
                "query groups: choose --num-query-groups dividing --num-attention-heads"
            )
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.kv_channels}: change --kv-channels")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(
                f"unknown recompute granularity {self.recompute_granularity!r}: use 'full' or 'selective'"
            )
        if self.recompute_method not in (None, "uniform", "block"):
            raise ValueError(
                f"unknown --recompute-method {self.recompute_method!r}: use 'uniform' or 'block'"
            )
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ValueError(f"--recompute-num-layers must be >= 1, got {self.recompute_num_layers}")
        for flag, value, choices in (
            ("--kernels", self.kernels, KERNEL_BACKENDS),
            ("--rope-kernel", self.rope_kernel, ROPE_BACKENDS),
            ("--attention-backend", self.attention_backend, ATTENTION_BACKENDS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")
        self._check_long_context()
        if self.attention_backend == "triton" and self.attention_dropout > 0:
            raise ValueError(
                "--attention-backend triton has no attention dropout: "
                "set --attention-dropout 0 or use --attention-backend sdpa/flash"
            )
        if self.num_experts is not None:
            self._validate_moe()

    def _validate_moe(self) -> None:
        """One-line errors for an impossible MoE configuration (before anything is built)."""
        if self.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and --num-experts {self.num_experts}"
            )
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        if self.add_bias_linear:
            raise ValueError("MoE experts have no biases: pass --disable-bias-linear with --num-experts")
        if self.moe_ffn_hidden_size < 1:
            raise ValueError(f"--moe-ffn-hidden-size must be >= 1, got {self.moe_ffn_hidden_size}")
        for flag, value, choices in (
            ("--moe-router-load-balancing-type", self.moe_router_load_balancing_type,
             ("aux_loss", "seq_aux_loss", "none")),
            ("--moe-router-score-function", self.moe_router_score_function, ("softmax", "sigmoid")),
            ("--moe-token-dispatcher-type", self.moe_token_dispatcher_type, ("alltoall", "allgather")),
        ):
            if value not in choices:
                raise ValueError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ValueError("--moe-router-pre-softmax applies to the softmax router: drop it or use "
                             "--moe-router-score-function softmax")
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0.0) < 0:
            raise ValueError("--moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")
        if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor <= 0:
            raise ValueError(f"--moe-expert-capacity-factor must be > 0, got {self.moe_expert_capacity_factor}")
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and shared < 1:
            raise ValueError(f"--moe-shared-expert-intermediate-size must be >= 1, got {shared}")
        if self.moe_shared_expert_gate and shared is None:
            raise ValueError("--moe-shared-expert-gate needs shared experts: set --moe-shared-expert-intermediate-size")
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"--moe-layer-freq must be >= 1, got {freq}")
        else:
            object.__setattr__(self, "moe_layer_freq", tuple(int(v) for v in freq))
            if len(self.moe_layer_freq) != self.num_layers or set(self.moe_layer_freq) - {0, 1}:
                raise ValueError(
                    f"--moe-layer-freq {list(self.moe_layer_freq)} must list 0 (dense) or 1 (MoE) for each "
                    f"of the {self.num_layers} layers"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (global, 0-based) has an MoE MLP (Megatron's --moe-layer-freq:
        an int N makes layers 0, N, 2N, ... MoE; a list gives 1/0 per layer)."""
        if self.num_experts is None:
            return False
        if isinstance(self.moe_layer_freq, int):
            return layer % self.moe_layer_freq == 0
        return bool(self.moe_layer_freq[layer])

    def _check_long_context(self) -> None:
        """RoPE scaling and sliding-window fields (normalises ``window_size`` to a tuple or None)."""
        if self.use_rope_scaling:
            if self.rope_scaling_type not in ROPE_SCALING_TYPES:
                raise ValueError(
                    f"unknown --rope-scaling-type {self.rope_scaling_type!r}: choose one of "
                    f"{', '.join(ROPE_SCALING_TYPES)}"
                )
            if self.position_embedding_type != "rope":
                raise ValueError("--use-rope-scaling needs --position-embedding-type rope")
            if not self.rope_scaling_factor > 0:
                raise ValueError(f"--rope-scaling-factor must be > 0, got {self.rope_scaling_factor}")
            if self.rope_scaling_original_max_position_embeddings < 1:
                raise ValueError(
                    "--rope-scaling-original-max-position-embeddings must be >= 1, got "
                    f"{self.rope_scaling_original_max_position_embeddings}"
                )
            if self.rope_scaling_type == "llama3" and not (
                0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor
            ):
                raise ValueError(
                    "llama3 RoPE scaling needs 0 < --rope-scaling-low-freq-factor < "
                    f"--rope-scaling-high-freq-factor, got {self.rope_scaling_low_freq_factor} and {self.rope_scaling_high_freq_factor}"
                )
        window = self.window_size
        if window is not None:
            window = tuple(int(w) for w in window)
            if len(window) != 2 or window[1] != 0 or window[0] < -1:
                raise ValueError(
                    f"--window-size {','.join(map(str, window))} is not (left, 0): megafast's decoders are "
                    "causal, give the left window only, e.g. --window-size 4095,0"
                )
            window = None if window[0] == -1 else window  # -1: infinite (Megatron), plain causal
            object.__setattr__(self, "window_size", window)

    @property
    def kernel_config(self) -> KernelConfig:
        """The :class:`KernelConfig` of ``kernels``/``attention_backend``/``rope_kernel``."""
        return KernelConfig(self.kernels, self.attention_backend, self.rope_kernel)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV weight: queries of every head plus one k and one v per group."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron)."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)


CP_COMM_TYPES = ("p2p", "a2a")


@dataclass
class ParallelConfig:
    """Tensor/pipeline/context/data-parallel layout; data-parallel size is derived from the world size.

    ``context_parallel_size`` C splits every sequence over C ranks (``cp_comm_type`` 'p2p': ring
    attention, 'a2a': all-to-all over heads; megafast.parallel.ring_attention / ulysses)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    cp_comm_type: str = "p2p"
    # expert-parallel ranks are drawn from the data-parallel ranks (megafast.parallel.state)
    expert_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.expert_model_parallel_size < 1:
            raise ValueError(f"--expert-model-parallel-size must be >= 1, got {self.expert_model_parallel_size}")
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError(
                "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1, got "
                f"{self.tensor_model_parallel_size} and {self.pipeline_model_parallel_size}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as Megatron: nothing to shard over
        if self.context_parallel_size < 1:
            raise ValueError(f"--context-parallel-size must be >= 1, got {self.context_parallel_size}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"--cp-comm-type {self.cp_comm_type}: choose one of {', '.join(CP_COMM_TYPES)}")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        cp = self.context_parallel_size
        if world_size % (model_parallel * cp):
            raise ValueError(
                f"world size {world_size} is not a multiple of tensor x pipeline parallel size "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} = {model_parallel}"
                + (f" x context parallel size {cp}" if cp > 1 else "")
                + ": change --nproc-per-node or the parallel sizes"
            )
        return world_size // (model_parallel * cp)


def validate_layout(model: GPTConfig, parallel: ParallelConfig, world_size: Optional[int] = None) -> None:
    """Check that ``parallel`` can shard ``model``; run before any process group work."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size is not None:
        parallel.data_parallel_size(world_size)
    if model.num_attention_heads % tp:
        raise ValueError(
            f"tensor parallel size {tp} does not divide {model.num_attention_heads} attention heads: "
            "choose --tensor-model-parallel-size dividing --num-attention-heads"
        )
    if model.num_query_groups % tp:
        raise ValueError(
            f"tensor parallel size {tp} does not divide {model.num_query_groups} query groups: "
            "choose --tensor-model-parallel-size dividing --num-query-groups"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(
            f"tensor parallel size {tp} does not divide FFN hidden size {model.ffn_hidden_size}: "
            "choose --tensor-model-parallel-size dividing --ffn-hidden-size"
        )
    if pp > model.num_layers:
        raise ValueError(
            f"pipeline parallel size {pp} exceeds the {model.num_layers} layers: "
            "use at most one stage per layer (--pipeline-model-parallel-size <= --num-layers)"
        )
    validate_context_parallel(model, parallel)
    validate_expert_parallel(model, parallel, world_size)


def validate_expert_parallel(model: GPTConfig, parallel: ParallelConfig, world_size: Optional[int] = None) -> None:
    """Expert parallelism (one line each): only for MoE models, EP divides the expert count and
    (given the world size) the data-parallel size, whose ranks it is drawn from."""
    ep = parallel.expert_model_parallel_size
    if ep == 1:
        return
    if model.num_experts is None:
        raise ValueError(
            f"--expert-model-parallel-size {ep} needs a mixture-of-experts model: pass --num-experts or use 1"
        )
    if model.num_experts % ep:
        raise ValueError(
            f"--expert-model-parallel-size {ep} does not divide --num-experts {model.num_experts}: "
            "choose an expert-parallel size dividing the expert count"
        )
    if world_size is not None:
        dp = parallel.data_parallel_size(world_size)
        if dp % ep:
            raise ValueError(
                f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} (expert-parallel "
                "ranks are drawn from the data-parallel ranks): change --nproc-per-node or the parallel sizes"
            )


def validate_context_parallel(model: GPTConfig, parallel: ParallelConfig, seq_length: Optional[int] = None) -> None:
    """Context-parallel constraints (one line each): the sequence splits into 2C equal chunks (and
    a rank's share into TP shards with sequence parallelism); all-to-all splits this TP rank's heads
    over C; attention dropout is not supported across CP ranks."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    if cp == 1:
        return
    if seq_length is not None:
        multiple = 2 * cp * (tp if parallel.sequence_parallel else 1)
        if seq_length % multiple:
            raise ValueError(
                f"--seq-length {seq_length} is not divisible by 2 x context parallel size {cp}"
                + (f" x tensor parallel size {tp} (sequence parallelism)" if parallel.sequence_parallel else "")
                + f" = {multiple}: choose a multiple of {multiple}"
            )
    if parallel.cp_comm_type == "a2a" and (model.num_attention_heads // tp) % cp:
        raise ValueError(
            f"--cp-comm-type a2a splits the {model.num_attention_heads // tp} attention heads per tensor-parallel "
            f"rank over context parallel size {cp}, which does not divide them: use --cp-comm-type p2p or "
            "another --context-parallel-size"
        )
    if model.attention_dropout > 0:
        raise ValueError(
            f"--attention-dropout {model.attention_dropout} is not supported with --context-parallel-size {cp}: "
            "pass --attention-dropout 0"
        )


@dataclass(frozen=True)
class PipelineSplit:
    """Megatron's uneven pipeline split (``megafast.pipeline.partition.split_layer_counts``).

    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``: transformer
    layers on the first / last pipeline rank (the other ranks share the rest evenly); 0 is allowed
    without interleaving (a stage holding only the embedding, or only the final norm and output
    layer: DeepSpeed-pipeline users' ``parts: [1, 5, ..., 5, 1]``), where Megatron asks for >= 1.
    ``--account-for-embedding-in-pipeline-split`` / ``--account-for-loss-in-pipeline-split``: the
    embedding / the output layer with the loss count as one layer each in the split.
    """

    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    account_for_embedding: bool = False
    account_for_loss: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("--decoder-first-pipeline-num-layers", self.first_stage_layers),
                            ("--decoder-last-pipeline-num-layers", self.last_stage_layers)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if (self.first_stage_layers is not None or self.last_stage_layers is not None) and (
                self.account_for_embedding or self.account_for_loss):
            raise ValueError("--decoder-first/last-pipeline-num-layers and --account-for-embedding/loss-in-"
                             "pipeline-split exclude each other (as in Megatron): use one kind")

    @property
    def uneven(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    @property
    def accounting(self) -> bool:
        return self.account_for_embedding or self.account_for_loss

    @property
    def active(self) -> bool:
        return self.uneven or self.accounting


LORA_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoRAConfig:
    """``--lora-rank --lora-alpha --lora-dropout --lora-target-modules``; rank 0 means no LoRA."""

    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.target_modules if m not in LORA_TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(
                f"--lora-target-modules {' '.join(self.target_modules) or '(none)'}: choose among "
                f"{', '.join(LORA_TARGET_MODULES)}"
            )

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)),
                   tuple(d.get("target_modules", LORA_TARGET_MODULES)))


@dataclass(frozen=True)
class QLoRAConfig:
    """``--qlora --qlora-block-size --qlora-double-quant``: the frozen base weights of the LoRA
    layers stored in NF4 over blocks of ``block_size``, the block scales 8-bit over blocks of
    ``double_quant_block_size`` with ``double_quant`` (megafast.quant)."""

    block_size: int = 64
    double_quant: bool = False
    double_quant_block_size: int = 256

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(
                f"--qlora-block-size must be a positive even number (QLoRA uses 64), got {self.block_size}"
            )

    @classmethod
    def from_args(cls, args: dict) -> Optional[QLoRAConfig]:
        """From the flags as a dict (a checkpoint's saved args too); None without ``--qlora``."""
        if not args.get("qlora"):
            return None
        return cls(int(args.get("qlora_block_size") or 64), bool(args.get("qlora_double_quant")))

    @property
    def bits_per_element(self) -> float:
        """Stored bits per base weight element: 4 + the block scales (4.5, or 4.127 double-quantized)."""
        if self.double_quant:
            return 4 + 8 / self.block_size + 32 / (self.block_size * self.double_quant_block_size)
        return 4 + 32 / self.block_size
