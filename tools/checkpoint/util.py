"""Megatron-LM's older converter name: the same as tools/checkpoint/convert.py (same flags).

    python tools/checkpoint/util.py --model-type GPT --loader llama2_hf --saver megatron \
        --load-dir HF_DIR --save-dir MEGATRON_CKPT --target-tensor-parallel-size 2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert import main  # noqa: E402

if __name__ == "__main__":
    main()
