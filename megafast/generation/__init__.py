"""Text generation from megafast checkpoints: KV-cached decoding at any TP/PP, one sequence or a
left-padded batch with per-sequence stopping (``generator``), temperature / top-k / top-p sampling
(``sampling``), stop sequences and streamed text (``stopping``), prompts from text, token ids or
chat messages (``prompts``), JSON Lines prompt files (``prompt_file``), and the command-line part
shared by ``tools/generate.py`` and ``tools/serve.py`` (``launch``)."""
