"""EMA: diffusers' warm-up rule, the averaging itself, the swap for sampling and the checkpoint state."""

import diffusers.training_utils as diffusers_training_utils
import pytest
import torch

from ddpm import EMA


@pytest.mark.parametrize("step, expected", [(1, 0.0), (2, 0.4054), (10, 0.8222), (1000, 0.99438), (10_000, 0.9990)])
def test_decay_values_with_train_unconditional_defaults(step, expected):
    ema = EMA(torch.nn.Linear(2, 2))
    assert ema.decay(step) == pytest.approx(expected, abs=5e-5 if expected < 0.99 else 5e-6)


def test_decay_matches_diffusers_ema_model_including_cap_floor_and_delay():
    params = list(torch.nn.Linear(2, 2).parameters())
    kwargs = dict(inv_gamma=2.0, power=2 / 3, update_after_step=5)
    theirs = diffusers_training_utils.EMAModel(params, decay=0.999, min_decay=0.3, use_ema_warmup=True, **kwargs)
    ours = EMA(torch.nn.Linear(2, 2), max_decay=0.999, min_decay=0.3, **kwargs)
    for step in [1, 5, 6, 7, 8, 50, 10_000, 10**7]:
        assert ours.decay(step) == pytest.approx(theirs.get_decay(step), rel=1e-12, abs=1e-12)


def test_update_follows_diffusers_ema_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    theirs = diffusers_training_utils.EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
    ours = EMA(model)
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        theirs.step(model.parameters())
        ours.update(model)
        assert ours.cur_decay == pytest.approx(theirs.cur_decay_value)
    for mine, reference in zip(ours.shadow.values(), theirs.shadow_params, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)


def test_applied_to_swaps_in_and_restores_live_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = EMA(model)
    ema.update(model)  # the first update copies the weights (decay 0)
    averaged = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied_to(model):
        for key, value in model.state_dict().items():  # every tensor swapped in, and it is the average
            assert torch.equal(value, averaged[key]) and torch.equal(value, ema.shadow[key]), key
            assert not torch.equal(value, live[key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key]), key


def test_state_round_trip_and_mismatch_errors():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, power=0.5)
    for _ in range(3):
        ema.update(model)
    restored = EMA(torch.nn.Linear(3, 3))
    restored.load_state_dict(ema.state_dict(), {k: v.clone() for k, v in ema.shadow.items()})
    assert restored.optimization_step == 3 and restored.power == 0.5
    assert all(torch.equal(restored.shadow[k], v) for k, v in ema.shadow.items())
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict(ema.state_dict(), {"weight": ema.shadow["weight"]})
    with pytest.raises(ValueError, match="shape"):
        restored.load_state_dict(ema.state_dict(), {"weight": torch.zeros(2, 2), "bias": ema.shadow["bias"]})


@pytest.mark.parametrize(
    "kwargs, match", [({"inv_gamma": 0}, "inv_gamma"), ({"power": -1}, "power"), ({"max_decay": 1.5}, "max_decay")]
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(torch.nn.Linear(2, 2), **kwargs)
