"""The Megatron-style training loop: data, steps, optimizer, logging, checkpoints."""
