"""Named UNet configurations shared by the tests (diffusers ``UNet2DModel`` keyword arguments)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

TINY = dict(
    sample_size=8,
    block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
    attention_head_dim=None,
    layers_per_block=1,
)

SCALE_SHIFT_DROPOUT = dict(
    sample_size=16,
    in_channels=1,
    out_channels=2,
    block_out_channels=[32, 64],
    down_block_types=["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"],
    resnet_time_scale_shift="scale_shift",
    dropout=0.1,
    norm_num_groups=8,
    attention_head_dim=16,
    layers_per_block=1,
    time_embedding_dim=48,
    mid_block_scale_factor=1.414,
    center_input_sample=True,
)
