"""Files: atomic writes, JSON and safetensors, images, training checkpoints, the diffusers format (export and
import), the Hub."""
