"""Training data: dataset loading, per-image transforms, the global-batch sampler and the seed streams."""
