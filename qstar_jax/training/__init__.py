"""Training: the trainer and its hooks, the jitted step, checkpoints, data, metrics, the curriculum."""
