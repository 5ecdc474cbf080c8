"""Evaluation: the FID Inception network and its weight conversion, FID / KID / IS, FID during training, the digits
evaluation, reproducible image generation and the sampling run, the speed benchmark (``benchmark``) and the
kill-and-resume soak test (``soak``)."""
