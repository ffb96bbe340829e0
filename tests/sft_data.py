"""Writes small SFT datasets (the files of tools/preprocess_data.py --dataset-type sft) directly
from token ids, for tests that need no tokenizer."""

from __future__ import annotations

import numpy as np

from megafast.data.indexed_dataset import IndexedDatasetBuilder
from megafast.data.sft_format import sft_paths, write_info


def write_sft_dataset(prefix: str, records: list[tuple[list[int], list[int], int]], tasks: list[str]) -> str:
    """``records``: (token ids, loss mask, task id); returns the token dataset prefix P_text_document."""
    paths = sft_paths(f"{prefix}_text_document")
    builders = [IndexedDatasetBuilder(paths.tokens + ".bin", np.uint16),
                IndexedDatasetBuilder(paths.loss_mask + ".bin", np.uint8),
                IndexedDatasetBuilder(paths.task_ids + ".bin", np.uint16)]
    for ids, mask, task in records:
        assert len(ids) == len(mask)
        builders[0].add_document(ids, [len(ids)])
        builders[1].add_document(mask, [len(mask)])
        builders[2].add_document([task], [1])
    for builder, path in zip(builders, (paths.tokens, paths.loss_mask, paths.task_ids)):
        builder.finalize(path + ".idx")
    write_info(paths.info, {"tasks": tasks})
    return paths.tokens


def random_records(n: int, vocab: int, num_tasks: int, seed: int, max_prompt: int = 8,
                   max_answer: int = 8) -> list[tuple[list[int], list[int], int]]:
    """Random prompt (mask 0) + answer + EOS (mask 1) records; EOS is vocab - 1. The answer counts
    up from a task-dependent offset of the prompt's first token, so it can be learned."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, a = int(rng.integers(1, max_prompt)), int(rng.integers(1, max_answer))
        prompt = rng.integers(0, vocab - 1, p)
        answer = (prompt[0] + 7 * (i % num_tasks) + np.arange(1, a + 1)) % (vocab - 1)
        ids = prompt.tolist() + answer.tolist() + [vocab - 1]
        out.append((ids, [0] * p + [1] * (a + 1), i % num_tasks))
    return out
