"""The schedules lightly's users import beside the losses (``lightly.utils.scheduler``), to the
letter: values (Python floats, exact: the same double arithmetic), warnings and errors."""
import math
import warnings

import pytest
import torch

import fastssl
from fastssl import CosineWarmupScheduler, cosine_schedule, cosine_warmup_schedule, linear_warmup_schedule


def cosine64(step, max_steps, start, end, period=None):
    """lightly 1.6's cosine_schedule: a half cosine over steps 0 … max_steps − 1 (end from then on,
    and for max_steps ≤ 1), or full cycles of ``period`` steps."""
    if period is not None:
        return end - (end - start) * (math.cos(2 * math.pi * step / period) + 1) / 2
    if max_steps <= 1 or step >= max_steps - 1:
        return end
    return end - (end - start) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


@pytest.mark.parametrize("period", [None, 7, 1], ids=["half-cycle", "period7", "period1"])
@pytest.mark.parametrize("max_steps", [0, 1, 2, 10, 101])
def test_cosine_schedule_equals_lightlys_formula(max_steps, period):
    for step in range(max_steps + 1):
        value = cosine_schedule(step, max_steps, 0.996, 1.0, period=period)
        assert isinstance(value, float)
        assert value == pytest.approx(cosine64(step, max_steps, 0.996, 1.0, period), rel=1e-15, abs=1e-15)


def test_cosine_schedule_warns_past_max_steps_unless_periodic():
    with pytest.warns(RuntimeWarning, match="Current step number 11 exceeds max_steps 10"):
        assert cosine_schedule(11, 10, 0.0, 1.0) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cosine_schedule(10, 10, 0.0, 1.0)
        cosine_schedule(25, 10, 0.0, 1.0, period=4)


@pytest.mark.parametrize("call,message", [
    (lambda: cosine_schedule(-1, 10, 0.0, 1.0), "Current step number -1 can't be negative"),
    (lambda: cosine_schedule(0, -1, 0.0, 1.0), "Total step number -1 can't be negative"),
    (lambda: cosine_schedule(0, 10, 0.0, 1.0, period=0), "Period 0 must be >= 1"),
    (lambda: cosine_warmup_schedule(0, 10, 1.0, 0.0, -1, 0.0), "Warmup steps -1 can't be negative"),
    (lambda: cosine_warmup_schedule(0, 10, 1.0, 0.0, 11, 0.0), "Warmup steps 11 must be <= max_steps"),
    (lambda: linear_warmup_schedule(0, -1, 0.0, 1.0), "Warmup steps -1 can't be negative"),
    (lambda: linear_warmup_schedule(-1, 5, 0.0, 1.0), "Current step number -1 can't be negative"),
    (lambda: linear_warmup_schedule(0, 5, -0.1, 1.0), "Start value -0.1 can't be negative"),
    (lambda: linear_warmup_schedule(0, 5, 0.0, 0.0), "End value 0.0 can't be non-positive"),
    (lambda: linear_warmup_schedule(0, 5, 2.0, 1.0), "Start value 2.0 must be less than or equal to end value 1.0"),
], ids=["step", "max_steps", "period", "warmup-negative", "warmup-too-long", "linear-warmup", "linear-step",
        "linear-start", "linear-end", "linear-order"])
def test_bad_arguments_raise_lightlys_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("period", [None, 5], ids=["half-cycle", "period5"])
def test_cosine_warmup_schedule_ramps_then_decays(period):
    max_steps, warmup = 20, 4
    for step in range(max_steps):
        value = cosine_warmup_schedule(step, max_steps, 1.0, 0.01, warmup, 0.0, period=period)
        if step < warmup:  # linear, reaching start_value at the last warm-up step
            expected = (step + 1) / warmup * 1.0
        else:
            expected = cosine64(step - warmup, max_steps - (warmup if period is None else 1), 1.0, 0.01, period)
        assert value == pytest.approx(expected, rel=1e-15, abs=1e-15), step
    assert cosine_warmup_schedule(1, 10, 1.0, 0.0, 4, 0.2, warmup_end_value=0.6) == pytest.approx(0.4)


def test_linear_warmup_schedule():
    assert [linear_warmup_schedule(s, 4, 0.0, 2.0) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_cosine_warmup_scheduler_scales_the_learning_rate():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=2, max_epochs=8)
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * cosine_warmup_schedule(e, 8, 1.0, 0.001, 2, 0.0) for e in range(8)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(0.25) and rates[2] == pytest.approx(0.5)
    assert (scheduler.warmup_epochs, scheduler.max_epochs, scheduler.start_value, scheduler.end_value) == (2, 8, 1.0, 0.001)
    assert fastssl.CosineWarmupScheduler is CosineWarmupScheduler
