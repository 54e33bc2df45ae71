"""Training: state, jitted step, loop, checkpoints, optimizer, metrics and multi-process set-up."""
