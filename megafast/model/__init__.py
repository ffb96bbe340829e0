"""GPT-2 and Llama-family models built from megafast's tensor-parallel layers."""

from megafast.config import GPTConfig
from megafast.model.gpt import GPTModel

__all__ = ["GPTConfig", "GPTModel"]
