"""Training: data-parallel gradient reduction, the mixed-precision (optionally sharded) optimizer,
learning-rate schedules, checkpointing, logging and the training loop."""
