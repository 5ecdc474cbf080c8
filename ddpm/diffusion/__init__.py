"""The diffusion maths: noise schedule, training loss, samplers. Torch only: no files, no images, no network."""
