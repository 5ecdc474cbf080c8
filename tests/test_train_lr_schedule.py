"""Learning-rate schedules: diffusers.optimization's formulas, counted in optimizer steps, resumable."""

import io

import diffusers.optimization as optimization
import pytest
import torch

from ddpm.training.lr_schedule import LR_SCHEDULERS, POLYNOMIAL_LR_END, build_lr_scheduler, lr_multiplier


def lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def optimizer(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def polynomial_without_decay_steps(total: int, steps: int, lr: float = 1e-3) -> list[float]:
    """diffusers' polynomial schedule with warm-up == total, which divides by zero at step == total (0 decay steps):
    its values at every other step, and there the value every shorter warm-up has at its end, the full rate."""
    theirs = optimization.get_polynomial_decay_schedule_with_warmup(optimizer(lr), total, total).lr_lambdas[0]
    with pytest.raises(ZeroDivisionError):
        theirs(total)
    for shorter in (total - 1, total // 2):
        end_of_warmup = optimization.get_polynomial_decay_schedule_with_warmup(optimizer(lr), shorter, total)
        assert end_of_warmup.lr_lambdas[0](shorter) == pytest.approx(1.0)
    expected = [lr * (1.0 if step == total else theirs(step)) for step in range(steps)]
    assert expected[total - 1] < lr and expected[total + 1] == pytest.approx(POLYNOMIAL_LR_END)
    return expected


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup, total", [(0, 50), (10, 50), (7, 100), (50, 50)])
def test_matches_diffusers_get_scheduler(name, warmup, total):
    rules = "1:10,0.5:25,0.1:40,0.01" if name == "piecewise_constant" else None  # only that schedule reads them
    ours = build_lr_scheduler(optimizer(), name, warmup, total, step_rules=rules)
    if name == "polynomial" and warmup == total:
        expected = polynomial_without_decay_steps(total, total + 5)
    else:
        theirs = optimization.get_scheduler(
            name, optimizer(), num_warmup_steps=warmup, num_training_steps=total, step_rules=rules
        )
        expected = lrs(theirs, total + 5)
    assert lrs(ours, total + 5) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name, cycles", [("cosine", 1.5), ("cosine_with_restarts", 3)])
def test_num_cycles_matches_diffusers(name, cycles):
    ours = build_lr_scheduler(optimizer(), name, 5, 60, num_cycles=cycles)
    fn = getattr(optimization, f"get_{name.replace('_with_restarts', '_with_hard_restarts')}_schedule_with_warmup")
    theirs = fn(optimizer(), 5, 60, num_cycles=cycles)
    assert lrs(ours, 65) == pytest.approx(lrs(theirs, 65), rel=1e-12)


def test_polynomial_power_matches_diffusers():
    ours = build_lr_scheduler(optimizer(), "polynomial", 3, 40, power=2.0)
    theirs = optimization.get_polynomial_decay_schedule_with_warmup(optimizer(), 3, 40, power=2.0)
    assert lrs(ours, 45) == pytest.approx(lrs(theirs, 45), rel=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_multiplier("step", 0, 10)


def test_state_dict_round_trips_through_weights_only_load():
    first = build_lr_scheduler(optimizer(), "cosine", 5, 30)
    lrs(first, 12)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build_lr_scheduler(optimizer(), "cosine", 5, 30)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert lrs(second, 10) == lrs(first, 10)
