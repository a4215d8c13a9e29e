"""Linear warmup to `lr`, then cosine, linear or no decay to `min_lr` at `max_steps`; the LambdaLR
that DeepSpeed steps gives the same value for every optimizer step."""

import math
from dataclasses import replace

import pytest
import torch

from llmscale.config.schema import LRDecay, OptimConfig
from llmscale.optim.lr_schedule import build_lr_scheduler, learning_rate

WARMUP = 10
MAX_STEPS = 110  # 100 decay steps after warmup
OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=WARMUP, decay=LRDecay.cosine)
MIDPOINT = WARMUP + (MAX_STEPS - WARMUP) // 2


@pytest.mark.parametrize("decay", list(LRDecay))
def test_warmup_rises_linearly_to_lr(decay: LRDecay) -> None:
    optim = replace(OPTIM, decay=decay)
    rates = [learning_rate(step, optim, MAX_STEPS) for step in range(WARMUP)]
    assert rates == pytest.approx([1e-3 * (step + 1) / WARMUP for step in range(WARMUP)])
    assert rates[0] == pytest.approx(1e-4)
    assert rates[-1] == pytest.approx(1e-3)
    # Warmup hands over to the decay without a jump.
    assert learning_rate(WARMUP, optim, MAX_STEPS) == pytest.approx(1e-3)


def test_cosine_is_half_way_at_the_midpoint_and_min_lr_at_max_steps() -> None:
    assert learning_rate(MIDPOINT, OPTIM, MAX_STEPS) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(MAX_STEPS, OPTIM, MAX_STEPS) == pytest.approx(1e-4)
    assert learning_rate(MAX_STEPS + 50, OPTIM, MAX_STEPS) == pytest.approx(1e-4)
    quarter = WARMUP + (MAX_STEPS - WARMUP) // 4
    expected = 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4))
    assert learning_rate(quarter, OPTIM, MAX_STEPS) == pytest.approx(expected)


def test_cosine_decays_monotonically_and_symmetrically() -> None:
    rates = [learning_rate(step, OPTIM, MAX_STEPS) for step in range(WARMUP, MAX_STEPS + 1)]
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    middle = (1e-3 + 1e-4) / 2
    for k in range(len(rates)):
        assert rates[k] - middle == pytest.approx(middle - rates[-1 - k], abs=1e-12)


def test_linear_decay_falls_by_equal_steps_to_min_lr() -> None:
    optim = replace(OPTIM, decay=LRDecay.linear)
    assert learning_rate(MIDPOINT, optim, MAX_STEPS) == pytest.approx(5.5e-4)
    assert learning_rate(WARMUP + 25, optim, MAX_STEPS) == pytest.approx(1e-4 + 9e-4 * 0.75)
    assert learning_rate(MAX_STEPS, optim, MAX_STEPS) == pytest.approx(1e-4)
    assert learning_rate(MAX_STEPS + 7, optim, MAX_STEPS) == pytest.approx(1e-4)
    rates = [learning_rate(step, optim, MAX_STEPS) for step in range(WARMUP, MAX_STEPS + 1)]
    drops = [earlier - later for earlier, later in zip(rates, rates[1:])]
    assert drops == pytest.approx([9e-6] * (MAX_STEPS - WARMUP))


def test_constant_keeps_lr_after_warmup() -> None:
    optim = replace(OPTIM, decay=LRDecay.constant)
    for step in (WARMUP, MIDPOINT, MAX_STEPS, MAX_STEPS * 2):
        assert learning_rate(step, optim, MAX_STEPS) == 1e-3


def test_no_warmup_starts_at_lr() -> None:
    optim = replace(OPTIM, warmup_steps=0)
    assert learning_rate(0, optim, 100) == pytest.approx(1e-3)
    assert learning_rate(50, optim, 100) == pytest.approx(5.5e-4)
    assert learning_rate(100, optim, 100) == pytest.approx(1e-4)


def test_warmup_as_long_as_training_does_not_divide_by_zero() -> None:
    optim = replace(OPTIM, warmup_steps=20)
    assert learning_rate(19, optim, 20) == pytest.approx(1e-3)
    assert learning_rate(20, optim, 20) == pytest.approx(1e-3)
    assert learning_rate(21, optim, 20) == pytest.approx(1e-4)


def _optimizer(optim: OptimConfig) -> torch.optim.Optimizer:
    """Two parameter groups, like llmscale's AdamW with and without weight decay."""
    matrix = torch.nn.Parameter(torch.ones(2, 2))
    vector = torch.nn.Parameter(torch.ones(2))
    return torch.optim.AdamW(
        [{"params": [matrix], "weight_decay": 0.1}, {"params": [vector], "weight_decay": 0.0}],
        lr=optim.lr,
    )


def _step(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    optimizer.step()


@pytest.mark.parametrize("decay", list(LRDecay))
def test_scheduler_drives_the_optimizer_with_the_same_values(decay: LRDecay) -> None:
    optim = replace(OPTIM, decay=decay)
    optimizer = _optimizer(optim)
    scheduler = build_lr_scheduler(optimizer, optim, MAX_STEPS)
    for step in range(MAX_STEPS + 3):
        expected = learning_rate(step, optim, MAX_STEPS)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
            [expected, expected], rel=1e-12
        ), f"step {step}"
        assert scheduler.get_last_lr() == pytest.approx([expected, expected], rel=1e-12)
        _step(optimizer)
        scheduler.step()


def test_resumed_scheduler_continues_the_schedule() -> None:
    optimizer = _optimizer(OPTIM)
    scheduler = build_lr_scheduler(optimizer, OPTIM, MAX_STEPS)
    for _ in range(37):
        _step(optimizer)
        scheduler.step()

    resumed_optimizer = _optimizer(OPTIM)
    resumed = build_lr_scheduler(resumed_optimizer, OPTIM, MAX_STEPS)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for step in range(37, 60):
        expected = learning_rate(step, OPTIM, MAX_STEPS)
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        _step(resumed_optimizer)
        resumed.step()
