"""megafast: Megatron-style pretraining and fine-tuning of GPT/Llama-family models."""

__version__ = "0.1.0"
