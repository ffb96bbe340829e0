"""Per-iteration training log: Megatron's stdout line plus tokens/s, TFLOP/s and MFU; the same
figures to TensorBoard and to ``--log-jsonl`` (one JSON object per logged iteration). MoE runs add
the router losses to all three and, per MoE layer, the choices routed to each expert per iteration
(TensorBoard ``moe/layer_{i}/tokens_per_expert/expert_{e}``, JSON ``tokens_per_expert``).

Only one rank logs (the caller decides which); files are appended line by line and flushed, so
a killed run leaves every completed line intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from megafast.extras import require


@dataclass
class IterationStats:
    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float  # per iteration, averaged over the logging interval
    tokens_per_sec: float
    tflops_per_gpu: float
    mfu: float
    lr: float
    global_batch_size: int
    lm_loss: float
    loss_scale: float
    grad_norm: Optional[float]
    skipped_iterations: int
    nan_iterations: int
    task_losses: Optional[dict[str, float]] = None  # fine-tuning: mean loss of each task's answer tokens
    moe_losses: Optional[dict[str, float]] = None  # MoE: load_balancing_loss / z_loss (megafast.training.moe_metrics)
    epoch: Optional[float] = None  # --train-epochs: passes over the training data done (consumed / per epoch)
    # MoE: layer -> choices routed to each expert per iteration (megafast.training.moe_metrics)
    tokens_per_expert: Optional[dict[int, list[float]]] = None

    def line(self) -> str:
        grad_norm = "n/a" if self.grad_norm is None else f"{self.grad_norm:.3f}"
        tasks = "".join(f" {name} loss: {loss:.6E} |" for name, loss in (self.task_losses or {}).items())
        epoch = "" if self.epoch is None else f" epoch: {self.epoch:.3f} |"
        return (
            f" iteration {self.iteration:8d}/{self.train_iters:8d} |" + epoch +
            f" consumed samples: {self.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {self.elapsed_ms:.1f} |"
            f" tokens per second: {self.tokens_per_sec:.1f} |"
            f" throughput per GPU (TFLOP/s/GPU): {self.tflops_per_gpu:.3f} |"
            f" MFU: {100 * self.mfu:.2f}% |"
            f" learning rate: {self.lr:.6E} |"
            f" global batch size: {self.global_batch_size:5d} |"
            f" lm loss: {self.lm_loss:.6E} |"
            f" loss scale: {self.loss_scale:.1f} |"
            f" grad norm: {grad_norm} |"
            f" number of skipped iterations: {self.skipped_iterations:3d} |"
            f" number of nan iterations: {self.nan_iterations:3d} |"
            + tasks
            + "".join(f" {name}: {value:.6E} |" for name, value in (self.moe_losses or {}).items())
        )

    def record(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "lm_loss": self.lm_loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_sec": self.tokens_per_sec,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "elapsed_ms_per_iteration": self.elapsed_ms,
            "global_batch_size": self.global_batch_size,
            "loss_scale": self.loss_scale,
            "skipped_iterations": self.skipped_iterations,
            "nan_iterations": self.nan_iterations,
            **({"task_losses": self.task_losses} if self.task_losses is not None else {}),
            **(self.moe_losses or {}),
            **({"epoch": self.epoch} if self.epoch is not None else {}),
            **({"tokens_per_expert": {str(i): v for i, v in self.tokens_per_expert.items()}}
               if self.tokens_per_expert is not None else {}),
        }


class TrainingLogger:
    """Writes stdout lines, TensorBoard scalars and JSON lines; a no-op object on non-logging ranks."""

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str] = None, jsonl_path: Optional[str] = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            require("tensorboard", "tensorboard", "--tensorboard-dir")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a", encoding="utf-8")

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def log_iteration(self, stats: IterationStats) -> None:
        if not self.enabled:
            return
        print(stats.line(), flush=True)
        record = stats.record()
        if self.writer is not None:
            for key, value in record.items():
                if key == "task_losses":
                    for task, loss in value.items():
                        self.writer.add_scalar(f"train/task_loss/{task}", loss, stats.iteration)
                elif key == "tokens_per_expert":  # one scalar per expert of each MoE layer
                    for layer, counts in value.items():
                        for e, count in enumerate(counts):
                            self.writer.add_scalar(f"moe/layer_{layer}/tokens_per_expert/expert_{e}", count,
                                                   stats.iteration)
                elif key != "iteration" and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, stats.iteration)
            self.writer.flush()
        self._write_json({"type": "train", **record})

    def log_validation(self, iteration: int, loss: float, split: str = "validation") -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        bar = "-" * 100
        print(f"{bar}\n {split} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |\n{bar}",
              flush=True)
        if self.writer is not None:
            self.writer.add_scalar(f"{split}/lm_loss", loss, iteration)
            self.writer.add_scalar(f"{split}/lm_loss_ppl", ppl, iteration)
            self.writer.flush()
        self._write_json({"type": split, "iteration": iteration, "lm_loss": loss, "ppl": ppl})

    def _write_json(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Timer:
    """Wall time between ``start()`` and ``elapsed()`` (seconds), resettable per logging interval."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def reset(self) -> float:
        now = time.perf_counter()
        elapsed, self.t0 = now - self.t0, now
        return elapsed
