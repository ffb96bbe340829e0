"""Optional dependencies: a feature outside the core install names the extra that brings it.

The core install (``pip install megafast``) runs every documented command: data preparation with
SentencePiece, HF ``tokenizer.json`` and GPT-2 BPE tokenizers, training, conversion to and from
Hugging Face (tokenizer export included), generation and planning. The rest is optional:

    data          pyarrow (parquet input), transformers (a Hugging Face tokenizer directory)
    tensorboard   tensorboard (``--tensorboard-dir``)
    demo          transformers and tensorboard (``tools/demo.py``: TensorBoard log, HF sample)
    triton        triton (the fused kernels; CUDA builds of torch already bring it)
    serve         fastapi and uvicorn (``tools/serve.py``, the OpenAI-compatible server)
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError, ValueError):
    """An optional package is missing; one line naming the feature, the package and the extra.

    A ValueError too, so the tools report it as their other user errors (``error: ...``)."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise MissingExtra: "``feature`` needs the ``module`` package: pip
    install megafast[``extra``]". An ImportError raised inside an installed ``module`` (a broken
    install) propagates unchanged."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingExtra(
            f"{feature} needs the {top} package: pip install 'megafast[{extra}]'", name=top
        ) from None


__all__ = ["MissingExtra", "require"]
