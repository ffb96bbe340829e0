"""Pretrain a GPT/Llama model with tensor, pipeline and data parallelism (Megatron-LM's flags).

    torchrun --nproc-per-node N pretrain_gpt.py --tensor-model-parallel-size T \
        --pipeline-model-parallel-size P --num-layers ... --data-path PREFIX ...

Runs on GPUs with nccl and on CPUs with gloo; `python pretrain_gpt.py ...` runs one process.
See `python pretrain_gpt.py --help` and megafast/arguments.py.
"""

from megafast.training.trainer import pretrain

if __name__ == "__main__":
    pretrain()
