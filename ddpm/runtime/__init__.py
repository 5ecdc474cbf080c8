"""The process a run lives in: torchrun / process-group helpers, signals, precision."""
