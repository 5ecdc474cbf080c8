"""Evaluation: the FID Inception network, FID / KID / IS, FID during training, the digits evaluation, and
reproducible image generation."""
