"""Training: the run configuration, the setup that builds a run's parts, the loop, its state and artifacts."""
