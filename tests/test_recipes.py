"""Recipe arithmetic and schedule shapes, read off transformers' own schedulers."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import get_scheduler

from hf_gradpower.recipes import (
    RECIPES,
    default_per_device_batch,
    get_recipe,
    gradient_accumulation_steps,
    schedule_arguments,
    steps_for_tokens,
)


def lr_curve(schedule: str, max_steps: int, warmup: int, lr_max=1e-3, ratio=0.1) -> list[float]:
    args = schedule_arguments(schedule, max_steps, warmup, ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers notes that num_stable_steps takes precedence
        sched = get_scheduler(args["lr_scheduler_type"], opt, num_warmup_steps=warmup, num_training_steps=max_steps,
                              scheduler_specific_kwargs=args["lr_scheduler_kwargs"])
    lrs = []
    for _ in range(max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cos", "wsd"])
def test_peak_at_warmup_end_and_lr_min_at_the_last_step(schedule):
    lrs = lr_curve(schedule, max_steps=200, warmup=20)
    assert lrs[20] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert all(b >= a for a, b in zip(lrs[:20], lrs[1:21], strict=True))  # linear warm-up rises


def test_wsd_is_constant_until_80_percent_then_decays_linearly():
    lrs = lr_curve("wsd", max_steps=200, warmup=20)
    assert lrs[20:161] == pytest.approx([1e-3] * 141)
    decay = torch.tensor(lrs[160:])
    steps = torch.diff(decay)
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-4)  # linear
    assert lrs[161] < 1e-3


def test_cos_is_a_half_cosine_to_lr_min():
    lrs = lr_curve("cos", max_steps=200, warmup=20)
    mid = 20 + (200 - 20) // 2
    assert lrs[mid] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=0.02)


def test_gradient_accumulation_keeps_the_global_batch():
    assert gradient_accumulation_steps(512, 32, 1) == 16
    assert gradient_accumulation_steps(512, 32, 8) == 2
    with pytest.raises(ValueError, match="not a multiple.*per_device_train_batch_size"):
        gradient_accumulation_steps(480, 64, 1)


def test_c4_length_is_twenty_tokens_per_parameter():
    steps = steps_for_tokens(200_000_000, 20, 512, 256)
    assert steps * 512 * 256 >= 20 * 200_000_000 > (steps - 1) * 512 * 256
    assert RECIPES["c4"].tokens_per_param == 20 and RECIPES["openwebtext"].global_batch == 480


def test_bad_recipe_and_schedule_names():
    with pytest.raises(ValueError, match="unknown recipe 'c5'.*c4"):
        get_recipe("c5")
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        schedule_arguments("linear", 100, 10)
    with pytest.raises(ValueError, match="warm-up"):
        schedule_arguments("cos", 100, 100)


@pytest.mark.parametrize("recipe, processes, want", [("tiny", 1, 16), ("tiny", 2, 8), ("tiny", 3, None),
                                                     ("c4", 8, 32), ("openwebtext", 8, 30), ("openwebtext", 1, 32)])
def test_default_per_device_batch_always_splits_the_global_batch(recipe, processes, want):
    r = RECIPES[recipe]
    if want is None:
        with pytest.raises(ValueError, match="multiple of 3"):
            default_per_device_batch(r.global_batch, processes, r.max_per_device_batch)
        return
    per_device = default_per_device_batch(r.global_batch, processes, r.max_per_device_batch)
    assert per_device == want
    accumulation = gradient_accumulation_steps(r.global_batch, per_device, processes)
    assert per_device * processes * accumulation == r.global_batch
