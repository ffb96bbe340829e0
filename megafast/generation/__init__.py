"""Text generation from megafast checkpoints: KV-cached decoding at any TP/PP (``generator``),
temperature / top-k / top-p sampling (``sampling``). Driven by ``tools/generate.py``."""
