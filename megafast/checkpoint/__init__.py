"""The on-disk checkpoint format, below training/, convert/ and generation/ (which all build on it).

Modules: ``paths`` (Megatron's directory, file and model-entry names), ``commit`` (the
``latest_checkpointed_iteration.txt`` marker), ``state_dict`` (atomic saving and loading of the
files' state dicts, model chunks in and out), ``args`` (the arguments saved with a checkpoint and
the GPTConfig they describe), ``layout`` (the model's tensors as full tensors: names, shapes, TP
splits) and ``reader`` (a committed checkpoint read as full tensors, from any TP/PP layout). The
format is DESIGN.md's 'Checkpoints'.
"""
