"""GPT datasets: Megatron-core parity of the sample order, index caching, and input errors."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from megafast.data import IndexedDataset, IndexedDatasetBuilder, build_gpt_datasets
from megafast.data.blended_dataset import BlendedDataset
from megafast.data.gpt_dataset import GPTDataset
from megafast.data.index_cache import CacheSync, IndexCache, load_or_build
from dist import run_distributed

EOD = 0
KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _write_corpus(prefix: str, num_docs: int, seed: int, max_len: int = 200) -> None:
    """Random documents of 1..max_len tokens ending in EOD, plus a few empty documents."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for i in range(num_docs):
        if i % 97 == 13:
            builder.add_document(np.zeros(0, np.uint16), [])  # a document with no sequence
        length = int(rng.integers(1, max_len))
        tokens = rng.integers(1, 30000, length).astype(np.uint16)
        tokens[-1] = EOD
        builder.add_document(tokens, [length])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpora")
    paths = {"A": str(root / "A"), "B": str(root / "B")}
    _write_corpus(paths["A"], 700, seed=1)
    _write_corpus(paths["B"], 600, seed=2)
    return paths


# ---------------------------------------------------------------------------------------------
# Megatron-core parity
# ---------------------------------------------------------------------------------------------


class _Tokenizer:
    """The few tokenizer attributes Megatron's GPT dataset reads."""

    eod = EOD
    vocab_size = None
    unique_identifiers = {"class": "TestTokenizer"}


def _megatron_datasets(blend, split, seq_length, sizes, seed, cache, eod_mask_loss=False, **kwargs):
    pytest.importorskip("megatron.core.datasets.helpers_cpp")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        tokenizer=_Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        path_to_cache=str(cache),
        mmap_bin_files=True,
        **kwargs,
    )
    return BlendedMegatronDatasetBuilder(MegatronGPTDataset, sizes, lambda: True, config).build()


def _assert_same_samples(ours, theirs) -> None:
    for split, (a, b) in enumerate(zip(ours, theirs)):
        if a is None or b is None:
            assert a is None and b is None, f"split {split}: {a} vs {b}"
            continue
        assert len(a) == len(b), f"split {split}: {len(a)} vs {len(b)} samples"
        if isinstance(a, GPTDataset):
            np.testing.assert_array_equal(a.document_index, b.document_index)
            np.testing.assert_array_equal(a.sample_index, b.sample_index)
            np.testing.assert_array_equal(a.shuffle_index, b.shuffle_index)
        else:
            np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
            np.testing.assert_array_equal(a.dataset_sample_index, b.dataset_sample_index)
        for i in range(len(a)):
            x, y = a[i], b[i]
            for key in KEYS:
                assert np.array_equal(x[key].numpy(), y[key].numpy()), f"split {split} item {i} {key}"
            if "dataset_id" in y:
                assert int(x["dataset_id"]) == int(y["dataset_id"])


PARITY_CASES = {
    # split, seq_length, (train, valid, test) samples, seed, expected (epochs, separate last) per split
    "one-epoch-train": ("969,30,1", 32, (1000, 50, 10), 5, [(1, False), (1, False), (5, False)]),
    "last-epoch-over-80%": ("98,2,0", 64, (3000, 300, 0), 7, [(3, False), (13, True), None]),
    "last-epoch-under-80%": ("969,30,1", 128, (700, 5, 1), 0, [(2, True), (1, False), (2, False)]),
    "zero-samples": ("90,8,2", 16, (100, 0, 0), 3, [(1, False), (1, False), (1, False)]),
}


@pytest.mark.megatron
@pytest.mark.parametrize("case", PARITY_CASES)
def test_single_prefix_matches_megatron(corpora, tmp_path: Path, case: str) -> None:
    split, seq_length, sizes, seed, epochs = PARITY_CASES[case]
    theirs = _megatron_datasets([[corpora["A"]], None], split, seq_length, list(sizes), seed, tmp_path / "m")
    ours = build_gpt_datasets([corpora["A"]], split, seq_length, sizes, seed, cache_dir=str(tmp_path / "o"))
    got = [None if d is None else (d.num_epochs, d.separate_last_epoch) for d in ours]
    assert got == epochs  # the configuration exercises what its name says
    _assert_same_samples(ours, theirs)


@pytest.mark.megatron
def test_partial_validation_sample_and_eod_mask_match_megatron(corpora, tmp_path: Path) -> None:
    args = ("90,8,2", 48, (500, 41, 3), 9)
    theirs = _megatron_datasets(
        [[corpora["B"]], None], *args[:2], list(args[2]), args[3], tmp_path / "m",
        eod_mask_loss=True, drop_last_partial_validation_sequence=False,
    )
    ours = build_gpt_datasets(
        corpora["B"], *args, eod_mask_loss=True, eod_token_id=EOD,
        drop_last_partial_validation_sequence=False,
    )
    valid = ours[1]
    last = valid[int(np.flatnonzero(np.asarray(valid.shuffle_index) == len(valid) - 1)[0])]
    assert last["loss_mask"][-1] == 0  # the kept partial sample is padded and masked
    assert any((ours[0][i]["loss_mask"] == 0).any() for i in range(20))  # EOD inputs are masked
    _assert_same_samples(ours, theirs)


@pytest.mark.megatron
def test_blend_matches_megatron(corpora, tmp_path: Path) -> None:
    sizes = (2000, 100, 10)
    theirs = _megatron_datasets(
        [[corpora["A"], corpora["B"]], [0.3, 0.7]], "969,30,1", 32, list(sizes), 11, tmp_path / "m"
    )
    ours = build_gpt_datasets(
        ["0.3", corpora["A"], "0.7", corpora["B"]], "969,30,1", 32, sizes, 11, cache_dir=str(tmp_path / "o")
    )
    assert all(isinstance(d, BlendedDataset) for d in ours)
    assert [len(d) for d in ours] == [2000, 100, 10]
    _assert_same_samples(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Semantics without Megatron
# ---------------------------------------------------------------------------------------------


def test_samples_tile_the_shuffled_document_stream(corpora) -> None:
    train, _, _ = build_gpt_datasets(corpora["A"], "90,10,0", 40, (900, 10, 0), seed=1)
    indexed = IndexedDataset(corpora["A"])
    stream = np.concatenate([indexed[int(d)] for d in train.document_index]).astype(np.int64)
    L = 40
    order = np.asarray(train.shuffle_index)
    assert sorted(order.tolist()) == list(range(len(train)))
    for i in range(0, len(train), 7):
        s = int(order[i])
        item = train[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), stream[s * L : s * L + L])
        np.testing.assert_array_equal(item["labels"].numpy(), stream[s * L + 1 : s * L + L + 1])
        assert item["loss_mask"].dtype.is_floating_point and bool((item["loss_mask"] == 1).all())
        np.testing.assert_array_equal(item["position_ids"].numpy(), np.arange(L))
    assert len(train) >= 900


def test_none_samples_is_one_epoch(corpora) -> None:
    train, valid, test = build_gpt_datasets(corpora["A"], "8,1,1", 50, (None, None, None), seed=3)
    for d in (train, valid, test):
        assert d.num_epochs == 1 and len(d) == (d.tokens_per_epoch - 1) // 50


def test_eod_mask_loss(corpora) -> None:
    train, _, _ = build_gpt_datasets(
        corpora["A"], "1", 64, (50, 0, 0), seed=2, eod_mask_loss=True, eod_token_id=EOD
    )
    for i in range(10):
        item = train[i]
        np.testing.assert_array_equal(item["loss_mask"].numpy() == 0, item["tokens"].numpy() == EOD)


def _cache_files(cache: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def test_cache_is_reused_without_rebuilding(corpora, tmp_path: Path) -> None:
    args = (["0.4", corpora["A"], "0.6", corpora["B"]], "969,30,1", 32, (500, 20, 5), 4)
    first = build_gpt_datasets(*args, cache_dir=str(tmp_path))
    files = _cache_files(tmp_path)
    assert not any(d.cache_hit for d in first)
    assert not any(".tmp" in name for name in files)
    assert sum(name.endswith("-description.txt") for name in files) == 3 * 2 + 3  # GPT x 6, blends x 3

    second = build_gpt_datasets(*args, cache_dir=str(tmp_path))
    assert all(d.cache_hit for d in second)
    assert all(g.cache_hit for d in second for g in d.datasets)
    assert _cache_files(tmp_path) == files  # nothing rewritten
    assert isinstance(second[0].datasets[0].sample_index, np.memmap)
    for a, b in zip(first, second):
        for i in range(0, len(a), 13):
            assert np.array_equal(a[i]["tokens"].numpy(), b[i]["tokens"].numpy())

    other_seed = build_gpt_datasets(*args[:4], 5, cache_dir=str(tmp_path))
    assert not any(d.cache_hit for d in other_seed)


@pytest.mark.parametrize("damage", ["truncate", "wrong-array", "no-description", "garbage"])
def test_damaged_cache_is_rebuilt(corpora, tmp_path: Path, damage: str, caplog) -> None:
    args = (corpora["A"], "969,30,1", 32, (300, 10, 2), 8)
    expected = build_gpt_datasets(*args)[0]
    train = build_gpt_datasets(*args, cache_dir=str(tmp_path))[0]
    sample_file = next(tmp_path.glob("*-GPTDataset-train-sample_index.npy"))
    if damage == "truncate":
        with open(sample_file, "r+b") as f:
            f.truncate(sample_file.stat().st_size // 2)
    elif damage == "wrong-array":
        np.save(sample_file, np.zeros((3, 2), np.int32))
    elif damage == "no-description":
        next(tmp_path.glob("*-GPTDataset-train-description.txt")).unlink()
    else:
        sample_file.write_bytes(b"not a numpy file")
    with caplog.at_level(logging.WARNING, logger="megafast.data.index_cache"):
        rebuilt = build_gpt_datasets(*args, cache_dir=str(tmp_path))[0]
    assert not rebuilt.cache_hit
    if damage != "no-description":
        assert "ignoring" in caplog.text
    np.testing.assert_array_equal(rebuilt.sample_index, train.sample_index)
    for i in range(0, len(expected), 11):
        assert np.array_equal(rebuilt[i]["tokens"].numpy(), expected[i]["tokens"].numpy())
    assert build_gpt_datasets(*args, cache_dir=str(tmp_path))[0].cache_hit  # repaired


def test_non_builder_rank_loads_and_fails_loudly_without_cache(corpora, tmp_path: Path) -> None:
    calls: list[str] = []
    waiting = CacheSync(is_builder=False, barrier=lambda: calls.append("barrier"))
    with pytest.raises(RuntimeError, match="file system that every rank sees"):
        build_gpt_datasets(corpora["A"], "1", 32, (10, 0, 0), 1, cache_dir=str(tmp_path), sync=waiting)
    assert calls == ["barrier"]
    build_gpt_datasets(corpora["A"], "1", 32, (10, 0, 0), 1, cache_dir=str(tmp_path))
    train, _, _ = build_gpt_datasets(
        corpora["A"], "1", 32, (10, 0, 0), 1, cache_dir=str(tmp_path), sync=waiting
    )
    assert train.cache_hit and calls == ["barrier", "barrier"]


def test_builder_failure_releases_waiting_ranks(tmp_path: Path) -> None:
    calls: list[str] = []
    sync = CacheSync(is_builder=True, barrier=lambda: calls.append("barrier"))

    def fail() -> dict[str, np.ndarray]:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        load_or_build(IndexCache(tmp_path, "X-train", "{}"), sync, ("a",), fail, lambda _: None)
    assert calls == ["barrier"]  # the other ranks are not left waiting forever


def _two_rank_build(rank: int, world_size: int, prefix: str, cache: str) -> tuple[bool, list[int]]:
    import torch.distributed as dist

    train, _, _ = build_gpt_datasets(prefix, "969,30,1", 32, (200, 5, 1), 3, cache, group=dist.group.WORLD)
    return train.cache_hit, [int(x) for x in train[5]["tokens"][:8]]


def test_rank0_builds_while_other_ranks_wait(corpora, tmp_path: Path) -> None:
    results = run_distributed(_two_rank_build, 2, corpora["A"], str(tmp_path))
    assert [hit for hit, _ in results] == [False, True]
    assert results[0][1] == results[1][1]


def test_datasets_pickle_by_reference_to_the_cache(corpora, tmp_path: Path) -> None:
    train, _, _ = build_gpt_datasets(corpora["A"], "969,30,1", 32, (100, 5, 1), 3, str(tmp_path))
    blob = pickle.dumps(train)
    assert len(blob) < 4096
    clone = pickle.loads(blob)
    assert np.array_equal(clone[3]["tokens"].numpy(), train[3]["tokens"].numpy())


# ---------------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["969,30,x", "1,2,3,4", "0,0,0", "", "-1,2,3", "1e3,1,1", "nan"])
def test_bad_split_strings(corpora, split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        build_gpt_datasets(corpora["A"], split, 32, (10, 1, 1), 1)


def test_bad_data_paths(corpora, tmp_path: Path) -> None:
    a, b = corpora["A"], corpora["B"]
    with pytest.raises(ValueError, match="odd number"):
        build_gpt_datasets([a, "0.5", b], "1", 32, (10, 0, 0), 1)
    with pytest.raises(ValueError, match="not a weight"):
        build_gpt_datasets([a, b], "1", 32, (10, 0, 0), 1)
    for bad in ("0", "-0.3", "inf"):
        with pytest.raises(ValueError, match="> 0"):
            build_gpt_datasets([bad, a, "0.7", b], "1", 32, (10, 0, 0), 1)
    with pytest.raises(ValueError, match="empty"):
        build_gpt_datasets([], "1", 32, (10, 0, 0), 1)
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"nope\.idx"):
        build_gpt_datasets(["0.5", a, "0.5", missing], "1", 32, (10, 0, 0), 1)
    os.symlink(a + ".idx", str(tmp_path / "half.idx"))
    with pytest.raises(ValueError, match=r"half\.bin"):
        build_gpt_datasets(str(tmp_path / "half"), "1", 32, (10, 0, 0), 1)


def test_bad_sizes_and_lengths(corpora) -> None:
    a = corpora["A"]
    with pytest.raises(ValueError, match="seq_length"):
        build_gpt_datasets(a, "1", 0, (10, 0, 0), 1)
    with pytest.raises(ValueError, match="num_samples for train"):
        build_gpt_datasets(a, "1", 32, (-1, 0, 0), 1)
    with pytest.raises(ValueError, match="triple"):
        build_gpt_datasets(a, "1", 32, (10, 0), 1)
    with pytest.raises(ValueError, match="seed"):
        build_gpt_datasets(a, "1", 32, (10, 0, 0), -1)
    with pytest.raises(ValueError, match="eod_token_id"):
        build_gpt_datasets(a, "1", 32, (10, 0, 0), 1, eod_mask_loss=True)
    with pytest.raises(ValueError, match="sample count"):
        build_gpt_datasets(["0.5", a, "0.5", a], "1", 32, (None, 0, 0), 1)


def test_split_without_sequences(corpora) -> None:
    # 700 sequences: "9990,9,1" gives test round(0.9999 * 700) = 700 .. 700, i.e. nothing.
    train, valid, test = build_gpt_datasets(corpora["A"], "9990,9,1", 32, (10, 1, 0), 1)
    assert test is None and valid is not None and train is not None
    with pytest.raises(ValueError, match="gives the test split no sequences"):
        build_gpt_datasets(corpora["A"], "9990,9,1", 32, (10, 1, 1), 1)
    _, _, none_share = build_gpt_datasets(corpora["A"], "99,1,0", 32, (10, 1, 5), 1)
    assert none_share is None
