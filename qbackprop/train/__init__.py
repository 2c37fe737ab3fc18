"""Training: datasets, the training loop, checkpoints, sweeps and their plots."""
