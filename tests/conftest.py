import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_tf32():
    """TF32 off for one test; the global settings are restored after it (even when it fails)."""
    from kernel_harness import tf32_disabled

    with tf32_disabled():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
