"""The training loop waits for the device only where it must: the loss is read on the host at log
intervals only (the optimizer's gradient-norm read is the one host read per step), and the batch
prefetcher hands out exactly the micro-batches, in the order, that inline reading gives."""

from __future__ import annotations

import os
import socket
import sys
import threading

import pytest
import torch
import torch.distributed as dist

from megafast.data.mock_dataset import MockGPTDataset
from megafast.data.prefetch import MicroBatchPrefetcher
from megafast.data.sampler import MicroBatchSampler
from megafast.training import trainer

TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--vocab-size", "97",
    "--make-vocab-size-divisible-by", "1", "--mock-data", "--seq-length", "16", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "8", "--eval-iters", "0", "--seed", "5",
    "--device", "cpu",
]
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def world_of_one(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _record_host_reads(monkeypatch, events: list) -> None:
    """Every host read of a tensor's value appends (method, caller file) to ``events``."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **k):
            events.append((_name, sys._getframe(1).f_code.co_filename))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _reads_per_iteration(monkeypatch, log_interval: int) -> tuple[list[list[tuple[str, str]]], list[float]]:
    run = trainer.setup(TINY + ["--log-interval", str(log_interval)])
    events: list = []
    losses: list[float] = []
    step = run.optimizer.step
    log = run.logger.log_iteration

    def step_marked():
        result = step()
        events.append(("step", ""))
        return result

    def log_marked(stats):
        losses.append(stats.lm_loss)
        return log(stats)

    monkeypatch.setattr(run.optimizer, "step", step_marked)
    monkeypatch.setattr(run.logger, "log_iteration", log_marked)
    _record_host_reads(monkeypatch, events)
    try:
        trainer.train(run)
    finally:
        monkeypatch.undo()
        run.logger.close()
    # events of iteration i: from after step i-1 (its logging included) to step i
    per_iter, current = [], []
    for e in events:
        if e[0] == "step":
            per_iter.append(current)
            current = []
        else:
            current.append(e)
    per_iter.append(current)  # after the last step: its logging
    return per_iter, losses


def test_loss_is_read_on_the_host_only_at_log_intervals(world_of_one, monkeypatch):
    per_iter, losses = _reads_per_iteration(monkeypatch, log_interval=4)
    assert len(per_iter) == 9 and len(losses) == 2
    for i, reads in enumerate(per_iter[:8]):
        # before step i+1: step i's logging when i is a multiple of 4; the step's own grad-norm read
        trainer_reads = [r for r in reads if r[1] == trainer.__file__]
        expected = 2 if i in (4,) else 0  # lm loss + nan count of iteration 4's log
        assert len(trainer_reads) == expected, f"iteration {i + 1}: trainer host reads {trainer_reads}"
        # megafast's own reads (torch.optim's AdamW and the fused CPU AdamW read their step counters,
        # CPU tensors even on CUDA: not device synchronisations)
        others = [r for r in reads if r[1] != trainer.__file__ and f"{os.sep}megafast{os.sep}" in r[1]
                  and not r[1].endswith("cpu_adamw.py")]
        assert len(others) == 1 and others[0][1].endswith("optimizer.py"), f"iteration {i + 1}: {others}"
    assert len([r for r in per_iter[8] if r[1] == trainer.__file__]) == 2  # the log after iteration 8


def test_logged_losses_do_not_depend_on_the_log_interval(world_of_one, monkeypatch):
    """The interval mean of the device-accumulated losses equals the mean of per-iteration logs."""
    _, every = _reads_per_iteration(monkeypatch, log_interval=1)
    dist.destroy_process_group()
    _, by4 = _reads_per_iteration(monkeypatch, log_interval=4)
    assert len(every) == 8 and len(by4) == 2
    for k in range(2):
        ref = sum(every[4 * k : 4 * k + 4]) / 4  # the host-side mean the trainer used to compute
        assert by4[k] == ref, f"interval {k}: {by4[k]} vs {ref}"  # the same fp64 additions


def _inline(dataset, sampler) -> list[dict[str, torch.Tensor]]:
    return [trainer._collate([dataset[i] for i in idx]) for idx in sampler]


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_keeps_the_sampler_order(depth):
    dataset = MockGPTDataset(40, 8, 50, seed=3)
    expected = _inline(dataset, MicroBatchSampler(40, 6, 3, 1, 2))  # DP rank 1 of 2, resumed at 6 samples
    pf = MicroBatchPrefetcher(dataset, iter(MicroBatchSampler(40, 6, 3, 1, 2)), trainer._collate,
                              torch.device("cpu"), depth=depth)
    got = []
    with pf:
        while True:
            try:
                got.append(pf.next())
            except StopIteration:
                break
    assert len(got) == len(expected) == 5
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert (g[k] is None and e[k] is None) or torch.equal(g[k], e[k]), k
    with pytest.raises(StopIteration):  # stays exhausted
        pf.next()


def test_prefetcher_raises_the_producer_error_and_closes():
    class Broken(torch.utils.data.Dataset):
        def __getitem__(self, i):
            if i == 6:
                raise KeyError(f"sample {i} is unreadable")
            return {"tokens": torch.full((4,), i)}

    pf = MicroBatchPrefetcher(Broken(), iter(MicroBatchSampler(100, 0, 2, 0, 1)), trainer._collate,
                              torch.device("cpu"), depth=2)
    assert pf.next()["tokens"][:, 0].tolist() == [0, 1]
    pf.next()
    pf.next()
    with pytest.raises(KeyError, match="sample 6"):
        pf.next()
    pf.close()
    endless = MicroBatchPrefetcher(MockGPTDataset(10**6, 4, 10, 0), iter(MicroBatchSampler(10**6, 0, 1, 0, 1)),
                                   trainer._collate, torch.device("cpu"), depth=2)
    endless.next()
    endless.close()  # a producer blocked on a full queue stops
    assert not any(t.name == "megafast-prefetch" and t.is_alive() for t in threading.enumerate())


def test_collate_drops_only_default_positions():
    items = [{"tokens": torch.arange(5), "position_ids": torch.arange(5)} for _ in range(2)]
    assert trainer._collate(items)["position_ids"] is None
    packed = [{"tokens": torch.arange(5), "position_ids": torch.tensor([0, 1, 0, 1, 2])}, items[0]]
    assert torch.equal(trainer._collate(packed)["position_ids"], torch.stack([p["position_ids"] for p in packed]))
