"""The optimizer: fp32 master weights, loss scaling, global-norm clipping, optional ZeRO-1 sharding.

:func:`build_optimizer` wraps AdamW (``torch.optim.AdamW``, fused on CUDA, foreach on CPU) or Lion around *master*
tensors derived from the :class:`~megafast.training.data_parallel.DataParallel` layout:

- plain: one master per parameter, the parameter itself when it is fp32, else an fp32 copy;
- distributed (ZeRO-1): one master per piece of a parameter that falls in this DP rank's shard of
  a bucket (a 1-D slice; a view of the parameter buffer when fp32, else an fp32 copy), so each
  DP rank keeps master weights and optimizer states for ``1/dp`` of the model only.

:meth:`MixedPrecisionOptimizer.step` on the DP-reduced ``main_grad`` s:

1. sum the tied-embedding gradients over ``embedding_group`` (first + last stage) and the
   sequence-parallel (replicated, sequence-sharded) parameters' gradients over TP;
2. unscale (fp16): g <- g / S;
3. global norm ``||g|| = sqrt(sum_p ||g_p||^2)`` over the whole model, each parameter once: TP
   shards summed over TP, TP-replicated parameters counted on TP rank 0 only, stages summed over
   PP, the last stage's tied output-layer copy skipped, ZeRO-1 shards summed over DP; with
   expert parallelism the experts' squares are summed over the expert-DP group (ZeRO-1 shards)
   and then over the EP group (each EP rank holds different experts), dense ones as before;
4. if ``||g||`` is not finite on any rank: skip the step, lower the loss scale (fp16) and return
   ``success=False``; else clip: g <- g * min(1, clip / (||g|| + 1e-6)) (Megatron's factor);
5. update the masters, copy them into the model parameters (all-gathering over DP for ZeRO-1)
   and zero the gradient buffers.

Weight decay follows Megatron: none for biases and 1-D parameters (norm weights).

The same holds for every data-parallel sharding strategy (megafast.training.data_parallel): with
``optim_grads``/``optim_grads_params`` a master's gradient is its piece of the rank's gradient
shard, and with ``optim_grads_params`` an fp32 master is (a view of) the rank's persistent
parameter shard, which the next forward all-gathers.

CPU offload (``optimizer_cpu_offload``, Megatron's ``--optimizer-cpu-offload``): the first
``optimizer_offload_fraction`` of the master elements (whole masters, in layout order) keep their
fp32 master and optimizer states in host memory (pinned with CUDA). The step then: clips the
device gradients, starts their device-to-host copies, updates the device masters (their kernels
overlap the copies), waits for the copies and updates the host masters on the CPU, then copies
the new weights back. The update is element-wise, so the result is the same as without offload
(bit for bit on CPU), and the state dict has the same format either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from megafast.parallel.mappings import all_reduce, group_size
from megafast.parallel.state import ParallelState
from megafast.training import cpu_adamw
from megafast.training.cpu_adamw import CpuAdamW
from megafast.training.data_parallel import DataParallel
from megafast.training.optimizer_reshard import assemble, reshard

STATE_FORMAT = "megafast.optimizer/1"


@dataclass
class OptimizerConfig:
    """Optimizer, mixed precision and loss-scaling settings (Megatron's flag names without ``--``).

    ``clip_grad`` 0 disables clipping. ``loss_scale`` None means dynamic loss scaling (fp16 only:
    start at ``initial_loss_scale``, halve after ``hysteresis`` consecutive overflowing steps,
    double after ``loss_scale_window`` clean ones, never below ``min_loss_scale``).
    ``max_skipped_steps``: raise once more consecutive steps than this were skipped for
    non-finite gradients and the loss scale cannot fall further.
    """

    optimizer: Literal["adam", "lion"] = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lion_beta1: float = 0.9
    lion_beta2: float = 0.99
    clip_grad: float = 1.0
    bf16: bool = False
    fp16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    use_distributed_optimizer: bool = False
    max_skipped_steps: int = 10
    # The update itself: "cuda" = megafast._C's multi-tensor AdamW/Lion (clipping folded in, bf16/fp16
    # model weights written in the same pass); "cpu" = megafast._C's two-pass AdamW on CPU tensors
    # (training/cpu_adamw.py, torch's bits); "torch" = torch.optim; "auto" = cuda on CUDA, cpu for
    # AdamW on CPU, each when built.
    fused_optimizer: Literal["auto", "torch", "cuda", "cpu"] = "auto"
    # masters + optimizer states of this fraction of the elements in host memory, stepped on the CPU
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "lion"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use --optimizer adam or lion")
        if self.lr < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2", "lion_beta1", "lion_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                flag = name.replace("lion_", "adam_").replace("_", "-")  # Lion's betas come from --adam-beta1/2
                raise ValueError(f"--{flag} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are mutually exclusive: choose one")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ValueError(f"--loss-scale must be > 0 (omit it for dynamic scaling), got {self.loss_scale}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ValueError(
                f"need 0 < --min-loss-scale <= --initial-loss-scale, got {self.min_loss_scale} "
                f"and {self.initial_loss_scale}"
            )
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ValueError(
                f"--loss-scale-window and --hysteresis must be >= 1, got {self.loss_scale_window} and {self.hysteresis}"
            )
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(
                f"--optimizer-offload-fraction must be in [0, 1], got {self.optimizer_offload_fraction}"
            )
        if self.fused_optimizer not in ("auto", "torch", "cuda", "cpu"):
            raise ValueError(f"unknown --fused-optimizer {self.fused_optimizer!r}: use auto, torch, cuda or cpu")


class LossScaler:
    """Loss scale S (Megatron's grad scaler): the loss is multiplied by S, gradients divided by it.

    Static (bf16/fp32: S = 1; fp16 with ``--loss-scale``) or dynamic: an overflowing step
    decrements a hysteresis counter and once it reaches 0 every overflowing step halves S (down to
    ``min_scale``); ``window`` clean steps in a row double S and reset the counter.
    """

    def __init__(
        self, scale: float, dynamic: bool, min_scale: float = 1.0, window: int = 1000, hysteresis: int = 2
    ) -> None:
        self.scale = float(scale)
        self.dynamic = dynamic
        self.min_scale = float(min_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    @classmethod
    def from_config(cls, config: OptimizerConfig) -> "LossScaler":
        if not config.fp16:
            return cls(1.0, dynamic=False)
        if config.loss_scale is not None:
            return cls(config.loss_scale, dynamic=False)
        return cls(
            config.initial_loss_scale, True, config.min_loss_scale, config.loss_scale_window, config.hysteresis
        )

    @property
    def at_minimum(self) -> bool:
        """True when an overflow can no longer be cured by lowering the scale."""
        return not self.dynamic or self.scale <= self.min_scale

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.window:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.growth_tracker = int(sd["growth_tracker"])
        self.hysteresis_tracker = int(sd["hysteresis_tracker"])


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023), decoupled weight decay::

        c = beta1 * m + (1 - beta1) * g
        p <- p - lr * (sign(c) + wd * p)
        m <- beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = (m * beta1).add_(g, alpha=1 - beta1).sign_()
                p.add_(update.add_(p, alpha=wd), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return None


@dataclass(eq=False)
class MasterShard:
    """One optimizer-owned tensor: elements ``[lo, hi)`` of ``param`` (flattened).

    ``master`` is what the optimizer updates (fp32); ``grad`` the matching view of ``main_grad``.
    ``alias`` means ``master`` shares storage with ``param`` (fp32 models): no copy back needed.
    """

    name: str
    param: nn.Parameter
    lo: int
    hi: int
    whole: bool  # [lo, hi) is the whole parameter and ``master`` has its shape
    master: torch.Tensor
    grad: torch.Tensor
    alias: bool
    decay: bool  # weight decay applies (not a bias or 1-D parameter)
    in_norm: bool  # counted in the global grad norm on this rank
    local: Optional[torch.Tensor] = None  # ZeRO-3: the persistent parameter shard piece (else None)
    host_grad: Optional[torch.Tensor] = None  # CPU offload: the host copy of ``grad`` the host step reads

    @property
    def offloaded(self) -> bool:
        return self.host_grad is not None

    def param_view(self) -> torch.Tensor:
        """The model-parameter elements this master is copied into."""
        if self.local is not None:
            return self.local
        return self.param.detach() if self.whole else self.param.detach().view(-1)[self.lo : self.hi]


@dataclass
class StepResult:
    success: bool  # False: non-finite gradients, the update was skipped
    grad_norm: float  # global norm before clipping (unscaled; inf/nan when skipped)
    loss_scale: float  # the scale that produced these gradients
    skipped_in_a_row: int  # consecutive skipped steps, this one included
    num_skipped: int  # skipped steps since the start of training


def _param_names(chunks: Sequence[nn.Module]) -> dict[int, str]:
    """Parameter names, prefixed with the chunk index when there are several chunks."""
    prefix = [f"{c}." if len(chunks) > 1 else "" for c in range(len(chunks))]
    return {id(p): prefix[c] + n for c, m in enumerate(chunks) for n, p in m.named_parameters()}


def decays(name: str, param: nn.Parameter) -> bool:
    """Megatron's rule: no weight decay for biases and 1-D parameters (norm weights)."""
    return param.dim() > 1 and not name.endswith(".bias")


class MixedPrecisionOptimizer:
    """AdamW/Lion over fp32 masters with loss scaling, clipping and optional ZeRO-1 (see module doc)."""

    def __init__(
        self, chunks: Sequence[nn.Module], ddp: DataParallel, state: ParallelState, config: OptimizerConfig
    ) -> None:
        if config.use_distributed_optimizer != ddp.use_distributed_optimizer:
            raise ValueError(
                "use_distributed_optimizer differs between the optimizer config and DataParallel: set both"
            )
        if [id(c) for c in chunks] != [id(c) for c in ddp.chunks]:
            raise ValueError("build the optimizer over the same model chunks as its DataParallel")
        self.chunks = list(chunks)
        self.ddp = ddp
        self.state = state
        self.config = config
        self.scaler = LossScaler.from_config(config)
        self.skipped_in_a_row = 0
        self.num_skipped = 0
        self.shards = self._build_shards()
        if config.optimizer_cpu_offload:
            self._offload(config.optimizer_offload_fraction)
        self.shared_params = [  # frozen ones (LoRA) have no gradient to sum
            p for c in self.chunks for p in getattr(c, "shared_embedding_parameters", lambda: [])() if p.requires_grad
        ]
        self.sp_params = [p for p in ddp.params if getattr(p, "sequence_parallel", False)]
        groups = [
            {"params": [s.master for s in self.shards if s.decay], "weight_decay": config.weight_decay},
            {"params": [s.master for s in self.shards if not s.decay], "weight_decay": 0.0},
        ]
        if config.optimizer == "adam":
            # CPU offload: masters on two devices in one optimizer; foreach groups them by device
            on_cuda = any(s.master.is_cuda for s in self.shards) and not config.optimizer_cpu_offload
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                groups,
                lr=config.lr,
                betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_eps,
                weight_decay=config.weight_decay,
                # CUDA: one fused kernel. CPU: the multi-tensor (foreach) update, bit-identical to the
                # per-parameter loop torch picks by default there, without a Python loop of ~10 ops per tensor
                fused=True if on_cuda else None,
                foreach=None if on_cuda else True,
            )
        else:
            self.optimizer = Lion(groups, lr=config.lr, betas=(config.lion_beta1, config.lion_beta2))
        self.cuda_step = not config.optimizer_cpu_offload and _cuda_step_enabled(
            config.fused_optimizer, self.shards)
        self.cpu_step = (_cpu_step(config, self.optimizer, self.shards)
                         if not self.cuda_step and not config.optimizer_cpu_offload else None)

    def _build_shards(self) -> list[MasterShard]:
        names = _param_names(self.chunks)
        tp_rank = self.state.tp_rank if self.state.tp_size > 1 else 0

        def make(p: nn.Parameter, lo: int, hi: int, whole: bool, grad=None, local=None) -> MasterShard:
            name = names[id(p)]
            view = local if local is not None else p.detach() if whole else p.detach().view(-1)[lo:hi]
            alias = p.dtype == torch.float32
            master = view if alias else view.to(torch.float32, copy=True)
            if grad is None:
                grad = p.main_grad if whole else p.main_grad.view(-1)[lo:hi]
            counted = (getattr(p, "tensor_model_parallel", False) or tp_rank == 0) and not getattr(
                p, "shared_embedding", False
            )
            return MasterShard(name, p, lo, hi, whole, master, grad, alias, decays(name, p), counted, local)

        shards = []
        if not self.ddp.use_distributed_optimizer:
            return [make(p, 0, p.numel(), True) for p in self.ddp.params]
        for bucket in self.ddp.buckets:
            lo, hi = bucket.shard_range(bucket.buffer.rank, bucket.buffer.size)  # DP, or expert-DP
            for p in bucket.params:
                start, end = bucket.buffer.ranges[id(p)]
                a, b = max(lo, start), min(hi, end)
                if a < b:
                    shards.append(make(p, a - start, b - start, False, self.ddp.local_grad(bucket, a, b),
                                       self.ddp.local_param(bucket, a, b)))
        return shards

    def _offload(self, fraction: float) -> None:
        """Move the masters of the first ``fraction`` of the elements (whole masters) to host memory."""
        total = sum(s.master.numel() for s in self.shards)
        pin = torch.cuda.is_available() and any(s.master.is_cuda for s in self.shards)
        done = 0
        for s in self.shards:
            if done >= fraction * total or fraction == 0.0:
                break
            done += s.master.numel()
            master = torch.empty(s.master.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
            master.copy_(s.master)
            s.master, s.alias = master, False
            s.host_grad = torch.empty(s.grad.shape, dtype=torch.float32, device="cpu", pin_memory=pin)

    # ---------------------------------------------------------------------------- public API

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.ddp.zero_grad()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model's parameters into the fp32 masters (after loading model weights only)."""
        for s in self.shards:
            if not s.alias:
                s.master.copy_(s.param_view().view_as(s.master))

    @torch.no_grad()
    def step(self) -> StepResult:
        """Reduce, check, clip and apply the gradients of one global batch (see module doc)."""
        self.ddp.finish_grad_sync()
        self._sync_model_parallel_grads()
        grads = [s.grad for s in self.shards]
        scale = self.scaler.scale
        if self.config.fp16 and scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        grad_norm = self._global_grad_norm()

        if not math.isfinite(grad_norm):
            self.scaler.update(found_inf=True)
            self.skipped_in_a_row += 1
            self.num_skipped += 1
            self.ddp.zero_grad()
            if self.skipped_in_a_row > self.config.max_skipped_steps and self.scaler.at_minimum:
                raise RuntimeError(
                    f"gradients were non-finite (inf/nan) for {self.skipped_in_a_row} steps in a row "
                    f"(loss scale {self.scaler.scale:g}): training diverged; lower --lr, check the data, "
                    "or use --bf16 instead of --fp16"
                )
            return StepResult(False, grad_norm, scale, self.skipped_in_a_row, self.num_skipped)

        clip = self.config.clip_grad
        coef = 1.0
        if clip > 0:
            coef = min(1.0, clip / (grad_norm + 1e-6))
            if coef < 1.0 and not self.cuda_step and self.cpu_step is None:
                torch._foreach_mul_(grads, coef)
        if self.cuda_step:  # one multi-tensor kernel per group: clip, update, write the model weights
            self._cuda_step(coef)
        elif self.cpu_step is not None:  # two fused passes, the clip factor folded into the first
            self.cpu_step.step({id(s.master): s.grad for s in self.shards}, coef)
            for s in self.shards:
                if not s.alias:
                    s.param_view().copy_(s.master)
        elif self.config.optimizer_cpu_offload:
            self._offloaded_step()
        else:
            for s in self.shards:
                s.master.grad = s.grad
            self.optimizer.step()
            for s in self.shards:
                s.master.grad = None
                if not s.alias:
                    s.param_view().copy_(s.master)
        self.ddp.gather_params()
        self.scaler.update(found_inf=False)
        self.skipped_in_a_row = 0
        self.ddp.zero_grad()
        return StepResult(True, grad_norm, scale, 0, self.num_skipped)

    def _offloaded_step(self) -> None:
        """CPU offload: device-to-host gradient copies overlapped with the device masters' update,
        then the host masters' update on the CPU (optimizers skip masters whose grad is None)."""
        host = [s for s in self.shards if s.offloaded]
        device = [s for s in self.shards if not s.offloaded]
        copied = None
        if host and torch.cuda.is_available() and host[0].grad.is_cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for s in host:
                    s.host_grad.copy_(s.grad, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
        else:
            for s in host:
                s.host_grad.copy_(s.grad)
        for shards, grad_of in ((device, lambda s: s.grad), (host, lambda s: s.host_grad)):
            if not shards:
                continue
            if shards is host and copied is not None:
                copied.synchronize()
            for s in shards:
                s.master.grad = grad_of(s)
            self.optimizer.step()
            for s in shards:
                s.master.grad = None
                if not s.alias:
                    s.param_view().copy_(s.master, non_blocking=s.offloaded)
        if copied is not None:
            torch.cuda.current_stream().synchronize()  # host buffers are reused by the next step

    def _cuda_step(self, grad_scale: float) -> None:
        """The update by megafast._C's multi-tensor kernels, on the torch optimizer's own state (the same
        ``exp_avg``/``exp_avg_sq``/``step`` entries, so checkpoints move freely between the two paths)."""
        from megafast.kernels.multi_tensor_optim import multi_tensor_adamw_, multi_tensor_lion_

        shard_of = {id(s.master): s for s in self.shards}
        adam = self.config.optimizer == "adam"
        for group in self.optimizer.param_groups:
            masters = group["params"]
            if not masters:
                continue
            shards = [shard_of[id(m)] for m in masters]
            states = [self.optimizer.state[m] for m in masters]
            for m, st in zip(masters, states):
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                    if adam:
                        st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                        st["step"] = torch.tensor(0.0)
                if adam and st["step"].is_cuda:  # loaded from a torch fused-AdamW state: keep it on the host
                    st["step"] = st["step"].cpu()
            model = [None if s.alias else s.param_view() for s in shards]
            common = dict(lr=group["lr"], weight_decay=group["weight_decay"], grad_scale=grad_scale)
            beta1, beta2 = group["betas"]
            grads, exp_avgs = [s.grad for s in shards], [st["exp_avg"] for st in states]
            if adam:
                steps = [st["step"] for st in states]
                torch._foreach_add_(steps, 1.0)
                multi_tensor_adamw_(
                    masters, grads, exp_avgs, [st["exp_avg_sq"] for st in states], model,
                    beta1=beta1, beta2=beta2, eps=group["eps"], step=int(steps[0].item()), **common,
                )
            else:
                multi_tensor_lion_(masters, grads, exp_avgs, model, beta1=beta1, beta2=beta2, **common)

    def _sync_model_parallel_grads(self) -> None:
        """Tied embeddings: sum over first+last stage. Sequence-parallel params: sum over TP."""
        pairs = ((self.shared_params, self.state.embedding_group), (self.sp_params, self.state.tp_group))
        if self.ddp.shard_grads:  # only the grad shards exist; the peers' shards cover the same elements
            for params, group in pairs:
                ids = {id(p) for p in params}
                grads = [s.grad for s in self.shards if id(s.param) in ids]
                if not grads or group_size(group) == 1:
                    continue
                summed = all_reduce(torch.cat([g.view(-1) for g in grads]), group)
                for g, s in zip(grads, summed.split([g.numel() for g in grads])):
                    g.copy_(s.view_as(g))
            return
        for params, group in pairs:
            if not params or group_size(group) == 1:
                continue
            summed = all_reduce(torch.cat([p.main_grad.view(-1) for p in params]), group)
            for p, s in zip(params, summed.split([p.numel() for p in params])):
                p.main_grad.copy_(s.view_as(p.main_grad))

    def _global_grad_norm(self) -> float:
        """sqrt of the sum of squares of every gradient element of the model, each counted once."""
        if self.state.ep_size > 1:
            return self._global_grad_norm_experts()
        counted = [s.grad for s in self.shards if s.in_norm]
        total = self._sum_of_squares(counted)
        total = all_reduce(total, self.state.model_parallel_group)
        if self.ddp.use_distributed_optimizer:
            total = all_reduce(total, self.state.dp_group)
        value = total.item()
        return math.sqrt(value) if value >= 0 else float("nan")  # nan stays nan

    def _sum_of_squares(self, grads: list[torch.Tensor]) -> torch.Tensor:
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).to(torch.float64)
            return (norms * norms).sum()
        device = self.ddp.buffers[0].grad_data.device if self.ddp.buffers else torch.device("cpu")
        return torch.zeros((), dtype=torch.float64, device=device)

    def _global_grad_norm_experts(self) -> float:
        """The global norm with expert parallelism: expert parameters' squares summed over their
        expert-DP shards and the EP ranks, dense ones over their DP shards, then both over TP x PP."""
        expert = [s for s in self.shards if s.in_norm and getattr(s.param, "expert_parallel", False)]
        ids = {id(s) for s in expert}
        dense = self._sum_of_squares([s.grad for s in self.shards if s.in_norm and id(s) not in ids])
        experts = self._sum_of_squares([s.grad for s in expert])
        if self.ddp.use_distributed_optimizer:
            dense = all_reduce(dense, self.state.dp_group)
            experts = all_reduce(experts, self.state.expert_dp_group)
        total = all_reduce(dense + all_reduce(experts, self.state.ep_group), self.state.model_parallel_group)
        value = total.item()
        return math.sqrt(value) if value >= 0 else float("nan")

    # -------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """This rank's optimizer state (tensors are references: serialise before stepping again).

        Format ``megafast.optimizer/1``::

            {"format", "optimizer": "adam"|"lion", "distributed": bool, "dp_rank", "dp_size",
             "layout": [(param name, param shape, lo, hi), ...]   # one per master, in order
             "torch_optimizer": torch.optim state_dict (master i = index i),
             "master_params": [fp32 tensor, or None where the master is the fp32 model parameter],
             "loss_scaler": {"scale", "growth_tracker", "hysteresis_tracker"},
             "skipped_in_a_row", "num_skipped"}

        Plain: identical on every DP rank. Distributed: each DP rank holds only its shards
        (``lo:hi`` of the flattened parameter) and must get back its own dict, from an optimizer
        built with the same layout (model, TP/PP/DP sizes, bucket size). Aliased fp32 masters
        are the model parameters themselves and are restored by loading the model's state dict.
        """
        return {
            "format": STATE_FORMAT,
            "optimizer": self.config.optimizer,
            "distributed": self.ddp.use_distributed_optimizer,
            "dp_rank": self.ddp.dp_rank,
            "dp_size": self.ddp.dp_size,
            "layout": self._layout(),
            "torch_optimizer": self.optimizer.state_dict(),
            "master_params": [None if s.alias else s.master for s in self.shards],
            "loss_scaler": self.scaler.state_dict(),
            "skipped_in_a_row": self.skipped_in_a_row,
            "num_skipped": self.num_skipped,
        }

    def _layout(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        return [(s.name, tuple(s.param.shape), s.lo, s.hi) for s in self.shards]

    def matches(self, sd: dict) -> bool:
        """Whether ``sd`` was saved by an optimizer with this one's layout (loadable directly)."""
        mine = (self.config.optimizer, self.ddp.use_distributed_optimizer, self.ddp.dp_rank, self.ddp.dp_size)
        return (sd.get("optimizer"), sd.get("distributed"), sd.get("dp_rank"), sd.get("dp_size")) == mine and [
            tuple(x) for x in sd.get("layout", [])] == [(n, tuple(s), lo, hi) for n, s, lo, hi in self._layout()]

    @torch.no_grad()
    def load_resharded(self, pieces: Sequence[dict]) -> None:
        """Restore the state saved by optimizers of any DP size and sharding strategy: ``pieces`` are
        the ``state_dict()`` s of every DP rank (one dict for a non-sharded optimizer). Load the
        model first. See megafast.training.optimizer_reshard."""
        for sd in pieces:
            if sd.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"not a megafast optimizer state (format {sd.get('format')!r}, want {STATE_FORMAT!r})")
            if sd["optimizer"] != self.config.optimizer:
                raise ValueError(
                    f"optimizer state was saved with --optimizer {sd['optimizer']} but this run uses "
                    f"{self.config.optimizer}: resume with the same --optimizer or pass --no-load-optim"
                )
        full = assemble(pieces)
        torch_sd, masters = reshard(full, self._layout(), [s.whole for s in self.shards],
                                    [s.decay for s in self.shards], self.optimizer.state_dict()["param_groups"])
        self.load_state_dict({
            "format": STATE_FORMAT, "optimizer": self.config.optimizer,
            "distributed": self.ddp.use_distributed_optimizer, "dp_rank": self.ddp.dp_rank,
            "dp_size": self.ddp.dp_size, "layout": self._layout(), "torch_optimizer": torch_sd,
            "master_params": masters, **full.extra,
        })

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` of an optimizer built the same way (load the model first)."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a megafast optimizer state (format {sd.get('format')!r}, want {STATE_FORMAT!r})"
            )
        mine = (self.config.optimizer, self.ddp.use_distributed_optimizer, self.ddp.dp_rank, self.ddp.dp_size)
        theirs = (sd["optimizer"], sd["distributed"], sd["dp_rank"], sd["dp_size"])
        if not self.ddp.use_distributed_optimizer:  # plain state is the same on every DP rank (rank 0 saves it)
            mine, theirs = mine[:2] + mine[3:], theirs[:2] + theirs[3:]
        if mine != theirs:
            raise ValueError(
                f"optimizer state was saved as (optimizer, distributed, dp_rank, dp_size)={theirs} but this "
                f"optimizer is {mine}: resume with the same --optimizer, parallel layout and sharding"
            )
        if [tuple(x) for x in sd["layout"]] != [(n, tuple(s), lo, hi) for n, s, lo, hi in self._layout()]:
            raise ValueError(
                "optimizer state does not match this model's parameter layout: resume with the same model, "
                "parallel sizes and --ddp-bucket-size"
            )
        self.optimizer.load_state_dict(sd["torch_optimizer"])
        for s, m in zip(self.shards, sd["master_params"]):
            if not s.alias:  # saved aliased (an fp32 model parameter): the loaded model holds it
                s.master.copy_(s.param_view().view_as(s.master) if m is None else m)
        self.scaler.load_state_dict(sd["loss_scaler"])
        self.skipped_in_a_row = int(sd["skipped_in_a_row"])
        self.num_skipped = int(sd["num_skipped"])


def _cuda_step_enabled(choice: str, shards: Sequence[MasterShard]) -> bool:
    """Whether the optimizer step runs megafast._C's multi-tensor kernels (``--fused-optimizer``)."""
    if choice == "torch" or not shards:
        return False
    from megafast.kernels.cuda_ext import cuda_available

    usable = cuda_available() and all(s.master.is_cuda for s in shards)
    if choice == "cuda" and not usable:
        raise ValueError(
            "--fused-optimizer cuda needs CUDA parameters and megafast's CUDA extension (on a CUDA machine "
            "with nvcc: pip install --no-build-isolation -e .): use --fused-optimizer auto or torch"
        )
    return usable


def _cpu_step(config: OptimizerConfig, optimizer: torch.optim.Optimizer,
              shards: Sequence[MasterShard]) -> Optional[CpuAdamW]:
    """The fused CPU AdamW step (``--fused-optimizer`` auto/cpu), or None for torch's update."""
    if config.fused_optimizer not in ("auto", "cpu"):
        return None
    if config.optimizer == "adam" and cpu_adamw.usable([s.master for s in shards], [s.grad for s in shards]):
        return CpuAdamW(optimizer)
    if config.fused_optimizer == "cpu":
        raise ValueError(
            "--fused-optimizer cpu needs --optimizer adam, fp32 CPU parameters, ATen's AVX2/AVX-512 kernels "
            "and megafast._C built from this checkout (pip install -e .): use --fused-optimizer auto or torch"
        )
    return None


def build_optimizer(
    chunks: Sequence[nn.Module], ddp: DataParallel, state: ParallelState, config: OptimizerConfig
) -> MixedPrecisionOptimizer:
    """The optimizer for ``chunks`` already wrapped by ``ddp`` (build ``ddp`` first)."""
    return MixedPrecisionOptimizer(chunks, ddp, state, config)


__all__ = [
    "LossScaler",
    "Lion",
    "MixedPrecisionOptimizer",
    "OptimizerConfig",
    "StepResult",
    "build_optimizer",
    "decays",
]
