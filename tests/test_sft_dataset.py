"""SFT training datasets: packing keeps whole records (each once per epoch), shifts labels and masks
within each record, restarts positions and numbers segments; padding mode holds one record per
item; long records are cut (and left out when no answer remains); task ids are global across a
blend; indices are deterministic and cached."""

from __future__ import annotations

import numpy as np
import pytest
from sft_data import random_records, write_sft_dataset

from megafast.data.sft_dataset import (
    SFTDataset,
    SFTDatasetConfig,
    SFTSource,
    build_sft_datasets,
    pack_first_fit,
)

VOCAB = 64
S = 20
TASK_MAP = [2, 0, 1]  # the dataset's task ids -> the run's global ones (not the identity, to be checked)


def test_first_fit_packing():
    bins = pack_first_fit(np.array([5, 9, 3, 12, 7, 20, 1]), 20)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum([5, 9, 3, 12, 7, 20, 1][i] for i in b) <= 20 for b in bins)
    assert bins[0] == [5]  # 20 fills a bin of its own, closed at once
    assert [0, 1, 2, 6] in bins  # 1 fits the first open bin with room
    assert len(pack_first_fit(np.array([15, 15, 15]), 20, max_open=2)) == 3


def check_item(item: dict, records: list[tuple[list[int], list[int], int]], members: list[int]) -> None:
    """``item`` holds ``members`` back to back, each as the test wrote it (``records``), cut to S + 1."""
    pos = 0
    for k, rid in enumerate(members):
        ids, mask, task = records[rid]
        tokens, mask = ids[:S + 1], mask[:S + 1]
        n = len(tokens) - 1
        assert item["tokens"][pos:pos + n].tolist() == tokens[:-1], f"record {rid}"
        assert item["labels"][pos:pos + n].tolist() == tokens[1:], f"record {rid}"
        assert item["loss_mask"][pos:pos + n].tolist() == [float(m) for m in mask[1:]], f"record {rid}"
        assert item["position_ids"][pos:pos + n].tolist() == list(range(n))
        if "segment_ids" in item:
            assert set(item["segment_ids"][pos:pos + n].tolist()) == {k}
        assert set(item["task_ids"][pos:pos + n].tolist()) == {TASK_MAP[task]}, f"record {rid}"
        pos += n
    assert item["loss_mask"][pos:].sum() == 0


@pytest.mark.parametrize("packing", [False, True])
def test_items_hold_whole_records(tmp_path, packing):
    records = random_records(40, VOCAB, 3, seed=1)
    records.append(([1] * 30 + [2] * 5, [0] * 30 + [1] * 5, 0))  # cut to S + 1 tokens: no answer left, left out
    records.append(([1] * 10 + [2] * 20, [0] * 10 + [1] * 20, 1))  # cut, keeps an answer
    prefix = write_sft_dataset(str(tmp_path / "d"), records, ["a", "b", "c"])
    config = SFTDatasetConfig(S, seed=3, packing=packing, cache_dir=str(tmp_path / "cache"))
    ds = SFTDataset(SFTSource(prefix), (0, len(records)), 100, "train", config, TASK_MAP)
    assert ds.num_truncated == 2 and ds.unlearnable.tolist() == [40]
    assert len(ds) >= 100 and ds.cache_hit is False
    first_epoch = []
    for i in range(len(ds)):
        members = ds.item_records[ds.item_offsets[i]:ds.item_offsets[i + 1]].tolist()
        check_item(ds[i], records, members)
        if len(first_epoch) < len(records) - 1:
            first_epoch += members
        if packing:
            assert ds[i]["segment_ids"].max() <= len(members)
    assert sorted(first_epoch) == [r for r in range(len(records)) if r != 40]  # each record once per epoch
    if packing:
        assert len(ds) < 100 * 1.2 and np.mean(np.diff(ds.item_offsets)) > 1.5  # several records per item
    else:
        assert (np.diff(ds.item_offsets) == 1).all()
    again = SFTDataset(SFTSource(prefix), (0, len(records)), 100, "train", config, TASK_MAP)
    assert again.cache_hit and np.array_equal(again.item_records, ds.item_records)


def test_blend_maps_task_names_to_global_ids(tmp_path):
    a = write_sft_dataset(str(tmp_path / "a"), random_records(30, VOCAB, 2, seed=2), ["code", "chat"])
    b = write_sft_dataset(str(tmp_path / "b"), random_records(30, VOCAB, 2, seed=3), ["math", "code"])
    (train, valid, test), tasks = build_sft_datasets(["0.5", a, "0.5", b], "90,10,0", S, [40, 8, 0], 5,
                                                      packing=True)
    assert tasks == ["code", "chat", "math"] and test is None and len(train) == 40 and len(valid) == 8
    seen = {d: set() for d in (0, 1)}
    for i in range(len(train)):
        item = train[i]
        seen[int(item["dataset_id"])] |= set(item["task_ids"][item["loss_mask"] > 0].tolist())
    assert seen[0] <= {0, 1} and seen[1] <= {2, 0} and 2 in seen[1]


def test_missing_sft_files_are_named(tmp_path):
    prefix = write_sft_dataset(str(tmp_path / "d"), random_records(5, VOCAB, 1, seed=0), ["t"])
    (tmp_path / "d_text_sft.json").unlink()
    with pytest.raises(ValueError, match="d_text_sft.json does not exist.*--dataset-type sft"):
        SFTSource(prefix)
