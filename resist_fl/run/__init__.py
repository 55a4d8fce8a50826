"""A run's settings, checkpoints and outputs (run directory, metrics, model file)."""
