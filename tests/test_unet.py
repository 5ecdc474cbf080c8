"""The UNet against diffusers' UNet2DModel: parameter counts, state-dict keys and shapes, outputs, dropout."""

import json

import diffusers
import pytest
import torch
import torch.nn.functional as F
from unet_configs import CONFIG_DIR, SCALE_SHIFT_DROPOUT, TINY

from ddpm import UNet, UNetConfig
from ddpm.io.diffusers_format import unet_config_from_diffusers
from ddpm.io.pretrained import load_unet_config
from ddpm.models.unet import Upsample


def _load(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


CONFIGS = {
    "cifar10": _load("ddpm-cifar10-32"),
    "train_unconditional_64": _load("train-unconditional-64"),
    "scale_shift_dropout": SCALE_SHIFT_DROPOUT,
    "tiny_one_head": TINY,
    # a key UNet2DModel ignores with positional time embeddings (used by learned ones only): accepted at any value
    "tiny_num_train_timesteps": {**TINY, "num_train_timesteps": 1000},
}


@pytest.mark.parametrize(
    "name, expected",
    [("ddpm-cifar10-32", 35_746_307), ("train-unconditional-64", 113_673_219), ("ddpm-celebahq-256", 113_673_219)],
)
def test_parameter_counts(name, expected):
    assert UNet(load_unet_config(CONFIG_DIR / f"{name}.json")).num_parameters() == expected


def _new_pair(name: str) -> tuple[diffusers.UNet2DModel, UNet]:
    """diffusers' UNet2DModel for ``CONFIGS[name]`` (seeded weights) and ours built from its config, in eval mode."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**CONFIGS[name]).eval()
    return reference, UNet(unet_config_from_diffusers(dict(reference.config))).eval()


def _input(reference: diffusers.UNet2DModel) -> torch.Tensor:
    """A seeded batch of two inputs of the model's shape."""
    cfg = reference.config
    return torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _new_pair(request.param)


def test_state_dict_keys_and_shapes_match(pair):
    reference, ours = pair
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert list(mine) == list(theirs)  # even the order, so diffs of saved files line up


def test_outputs_match_with_diffusers_weights(pair):
    reference, ours = pair
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = _input(reference)
    with torch.no_grad():
        for t in (torch.tensor([0, 999]), torch.tensor(500), 17):
            expected = reference(x, t).sample
            assert (ours(x, t) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["cifar10", "scale_shift_dropout", "tiny_one_head"])
def test_gradients_match_diffusers(name):
    """Every parameter's gradient, not only the output: a layer computed another way than diffusers' (the upsampling
    convolution is a transposed one here) must train the same weights."""
    reference, ours = _new_pair(name)  # in eval mode: dropout off, so both see the same network
    ours.load_state_dict(reference.state_dict(), strict=True)
    x, t = _input(reference), torch.tensor([3, 700])
    reference(x, t).sample.square().mean().backward()
    ours(x, t).square().mean().backward()
    expected = dict(reference.named_parameters())
    for key, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, expected[key].grad, rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_upsample_equals_nearest_interpolation_then_its_convolution(memory_format):
    """The folded transposed convolution against the definition (diffusers' ``Upsample2D``), forward and backward,
    on an odd, non-square input."""
    torch.manual_seed(0)
    upsample = Upsample(6)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=memory_format).requires_grad_()
    expected = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = upsample(x)
    assert got.shape == (2, 6, 10, 14)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(expected)
    inputs = (x, upsample.conv.weight, upsample.conv.bias)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for a, b in zip(torch.autograd.grad(got, inputs, grad_out), expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel sums stay in float32; the convolution runs in bf16
        low = upsample(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def _dropout_in_logical_order(self: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``nn.Dropout`` with its mask drawn in the tensor's logical order. torch fills the mask in memory order, and on
    the CPU diffusers' activations are channels-last after an attention block (ours stay contiguous): the same
    seed would then drop other elements, whatever the placement."""
    if not self.training or self.p == 0:  # as torch: no random numbers drawn (diffusers' attention has p=0 ones)
        return x
    keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) >= self.p
    return x * keep / (1 - self.p)


def test_dropout_sits_where_diffusers_puts_it(monkeypatch):
    """In training mode the same seed gives the same dropout masks only if dropout is applied to the same tensors,
    in the same order, as in diffusers' ResnetBlock2D (after norm2 and the activation, before conv2)."""
    monkeypatch.setattr(torch.nn.Dropout, "forward", _dropout_in_logical_order)
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**SCALE_SHIFT_DROPOUT).train()
    ours = UNet(unet_config_from_diffusers(dict(reference.config))).train()
    ours.load_state_dict(reference.state_dict(), strict=True)
    cfg = reference.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 800])
    outputs = {}
    with torch.no_grad():
        for seed in (5, 6):
            torch.manual_seed(seed)
            expected = reference(x, t).sample
            torch.manual_seed(seed)
            outputs[seed] = ours(x, t)
            assert (outputs[seed] - expected).abs().max().item() <= 1e-5
        evaluated = ours.eval()(x, t)
    # dropout was active: another seed, or no dropout, gives another output
    assert (outputs[5] - outputs[6]).abs().max().item() > 1e-2
    assert (outputs[5] - evaluated).abs().max().item() > 1e-2


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_dict(TINY))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 600])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_round_trip_through_dict_and_diffusers_config():
    cfg = UNetConfig.from_dict(SCALE_SHIFT_DROPOUT)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    diffusers_config = dict(diffusers.UNet2DModel(**SCALE_SHIFT_DROPOUT).config)
    assert unet_config_from_diffusers(diffusers_config) == cfg


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"], "down_block_types"),
        ("up_block_types", ["UpBlock2D", "ResnetUpsampleBlock2D"], "up_block_types"),
        ("up_block_types", ["UpBlock2D"], "up_block_types"),
        ("block_out_channels", [], "block_out_channels"),
        ("norm_num_groups", 5, "norm_num_groups"),
        ("attention_head_dim", 5, "attention_head_dim"),
        ("attn_norm_num_groups", 5, "attn_norm_num_groups"),
        ("act_fn", "tanh", "act_fn"),
        ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift"),
        ("dropout", 1.5, "dropout"),
        ("sample_size", 9, "sample_size"),
        ("sample_size", [8, 16], "sample_size"),
        ("downsample_padding", -1, "downsample_padding"),
        ("norm_eps", 0.0, "norm_eps"),
        ("layers_per_block", 0, "layers_per_block"),
        ("time_embedding_dim", 0, "time_embedding_dim"),
        ("time_embedding_type", "fourier", "time_embedding_type"),
        ("time_embedding_type", "learned", "time_embedding_type"),
        ("class_embed_type", "timestep", "class_embed_type"),
        ("num_class_embeds", 10, "num_class_embeds"),
        ("downsample_type", "resnet", "downsample_type"),
        ("upsample_type", "resnet", "upsample_type"),
        ("mid_block_type", None, "mid_block_type"),
        ("cross_attention_dim", 768, "cross_attention_dim"),
    ],
)
def test_invalid_configs_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**TINY, key: value})


def test_accepted_diffusers_keys_and_private_keys():
    cfg = unet_config_from_diffusers(
        {
            **TINY,
            "_class_name": "UNet2DModel",
            "_diffusers_version": "0.1.0",
            "time_embedding_type": "positional",
            "class_embed_type": None,
            "downsample_type": "conv",
            "upsample_type": "conv",
            "mid_block_type": "UNetMidBlock2D",
            "num_train_timesteps": None,
        }
    )
    assert cfg == UNetConfig.from_dict(TINY)


@pytest.mark.parametrize("timestep", [3, torch.tensor(3), torch.tensor([3, 3])])
def test_timestep_forms(timestep):
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_dict(TINY)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep), model(x, torch.tensor([3, 3])))
