"""The network: the residual-attention UNet (diffusers UNet2DModel-exact) and its EMA. Torch only."""
