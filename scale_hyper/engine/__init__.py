"""Training engine: DeepSpeed setup, residency of the shared hypernetwork, checkpoints, tracking."""
