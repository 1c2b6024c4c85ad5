"""AdamPower's one-pass CPU step against phi-then-AdamW references, and its fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_llama
from test_attach import phi_reference, run_steps

import hf_gradpower as gp
from hf_gradpower.adampower import AdamPower
from hf_gradpower.kernels import cpu, dispatch

needs_kernel = pytest.mark.skipif(not cpu.fast_kernel_available(), reason="C kernel unavailable")
HYPER = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def _params(seed=0, shapes=((1000, 37), (5,), (70_001,))):
    """Tensors big enough to take the multithreaded path, with an odd-sized vector tail."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    scales = [10.0 ** torch.empty(p.shape).uniform_(-6, 0, generator=g) for p in params]  # 1e-6 .. 1
    out = [torch.randn(p.shape, generator=g) * s for p, s in zip(params, scales, strict=True)]
    out[0].view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-40])  # zeros and a subnormal stay exact through phi
    return out


def _run(opt, params, steps, before_step=None):
    for step in range(steps):
        grads = _grads(params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        if before_step is not None:
            before_step(params)
        opt.step()
        yield grads


def _phi_by_hand(p):
    return lambda params: [q.grad.copy_(phi_reference(q.grad, p)) for q in params]


def _float64_reference(steps, p):
    """phi by the formula and AdamW by torch, both in float64: an independent reference."""
    params = [torch.nn.Parameter(q.detach().double()) for q in _params()]
    opt = torch.optim.AdamW(params, foreach=False, **HYPER)
    for step in range(steps):
        for q, g in zip(params, _grads(params, step), strict=True):
            q.grad = g.double().abs().pow(p) * g.double().sign()
        opt.step()
    return params


@needs_kernel
def test_one_pass_step_matches_float64_reference_as_closely_as_torch_does():
    steps, p = 20, 1.2
    ours = _params()
    opt = AdamPower(ours, p=p, fused=True, **HYPER)
    for grads in _run(opt, ours, steps):
        assert all(torch.equal(q.grad, g) for q, g in zip(ours, grads, strict=True)), "one-pass path must have run"
    hooked = _params()
    list(_run(gp.attach(torch.optim.AdamW(hooked, fused=True, **HYPER), p), hooked, steps))
    ref = _float64_reference(steps, p)
    for a, b, r in zip(ours, hooked, ref, strict=True):
        err_ours = (a.detach().double() - r.detach()).abs().max().item()
        err_torch = (b.detach().double() - r.detach()).abs().max().item()
        # float32 rounding of |theta| <= ~4 over 20 steps is ~1e-5; a wrong formula is off by ~lr = 3e-3
        assert err_ours <= max(2 * err_torch, 2e-6), (err_ours, err_torch)


@needs_kernel
@pytest.mark.parametrize("p", [0.8, 1.2, 1.5])
def test_one_pass_step_tracks_phi_then_adamw(p):
    ours, ref = _params(), _params()
    list(_run(AdamPower(ours, p=p, **HYPER), ours, 5))
    list(_run(torch.optim.AdamW(ref, **HYPER), ref, 5, before_step=_phi_by_hand(p)))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_p_one_is_bit_identical_to_torch_adamw(fused):
    bare, ours = tiny_llama(), tiny_llama()
    losses = run_steps(bare, torch.optim.AdamW(bare.parameters(), fused=fused, **HYPER))
    assert run_steps(ours, AdamPower(ours.parameters(), p=1.0, fused=fused, **HYPER)) == losses
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), ours.parameters(), strict=True))


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}, {"foreach": True}])
def test_groups_the_kernel_does_not_implement_fall_back_to_phi_then_torch(option):
    """amsgrad/maximize: not in the kernel -> power_ then torch's AdamW, bit for bit; foreach: same numbers."""
    ours, ref = _params(), _params()
    opt = AdamPower(ours, p=1.2, **HYPER, **option)
    for grads in _run(opt, ours, 3):
        if "foreach" not in option:  # the hook-style path leaves phi(g) in .grad
            assert torch.equal(ours[0].grad, gp.sign_power(grads[0], 1.2))
    list(_run(gp.attach(torch.optim.AdamW(ref, **HYPER, **option), 1.2), ref, 3))
    for a, b in zip(ours, ref, strict=True):
        if "foreach" in option:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5)
        else:
            assert torch.equal(a, b)


def test_eager_kernel_mode_and_bf16_params_take_the_fallback(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    ours, ref = _params(), _params()
    list(_run(AdamPower(ours, p=1.2, **HYPER), ours, 2))
    list(_run(gp.attach(torch.optim.AdamW(ref, **HYPER), 1.2), ref, 2))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    monkeypatch.delenv(dispatch.ENV_VAR)
    half = [torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))]
    opt = AdamPower(half, p=1.2, **HYPER)
    half[0].grad = torch.full((64,), 1e-2, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(half[0].grad, gp.sign_power(torch.full((64,), 1e-2, dtype=torch.bfloat16), 1.2))


def test_phi_applied_before_clipping_is_not_applied_again():
    """apply_now (GradPowerTrainer's before_clip order) + step == SGD-like check via AdamW's first step."""
    ours, ref = _params(), _params()
    opt = AdamPower(ours, p=1.5, **HYPER)
    list(_run(opt, ours, 3, before_step=lambda ps: gp.apply_now(opt)))
    list(_run(gp.attach(torch.optim.AdamW(ref, **HYPER), 1.5), ref, 3))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_the_global_hook_leaves_adampower_alone():
    """If the attach hook also fired, phi would run twice: compare with phi applied exactly once."""
    ours, ref = _params(), _params()
    list(_run(gp.attach(AdamPower(ours, p=1.2, foreach=True, **HYPER), 2.0), ours, 3))
    list(_run(torch.optim.AdamW(ref, foreach=True, **HYPER), ref, 3, before_step=_phi_by_hand(2.0)))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=2e-6)


def test_registry_builds_it_and_it_is_an_adamw_with_a_plain_state_dict():
    model = tiny_llama()
    opt = gp.build_optimizer(model, "adampower", lr=1e-3, p=1.3)
    assert isinstance(opt, AdamPower) and isinstance(opt, torch.optim.AdamW) and gp.gradpower_p(opt) == 1.3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    model, opt, sched = Accelerator(cpu=True).prepare(model, opt, sched)
    run_steps(model, opt, steps=2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    plain = gp.build_optimizer(model, "adamw", lr=1e-3)
    assert type(plain) is torch.optim.AdamW
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's AdamW reads AdamPower's checkpoint
    assert plain.state[next(model.parameters())]["exp_avg"].abs().sum() > 0
    again = gp.build_optimizer(model, "adampower", lr=1e-3, p=1.2)
    again.load_state_dict(opt.state_dict())
    assert gp.gradpower_p(again) == 1.3


def test_grad_scaler_unscales_before_the_one_pass_step():
    """GradScaler (scale 2^10): AdamPower sees unscaled gradients, the update equals the fp32 run."""
    w_amp, w_ref = _params(), _params()
    opt_amp = AdamPower(w_amp, p=1.2, **HYPER)
    opt_ref = AdamPower(w_ref, p=1.2, **HYPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        for w, opt, scale in ((w_amp, opt_amp, scaler), (w_ref, opt_ref, None)):
            opt.zero_grad()
            loss = sum((q * g).sum() for q, g in zip(w, _grads(w, step), strict=True))
            if scale is None:
                loss.backward()
                opt.step()
            else:
                scale.scale(loss).backward()
                scale.step(opt)
                scale.update()
    for a, b in zip(w_amp, w_ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_loading_a_checkpoint_saved_without_gradpower_keeps_p():
    ours, ref = _params(), _params()
    plain = torch.optim.AdamW(ref, **HYPER)
    list(_run(plain, ref, 1))
    opt = AdamPower(ours, p=1.4, **HYPER)
    opt.load_state_dict(plain.state_dict())
    assert gp.gradpower_p(opt) == 1.4


def test_bad_p_is_rejected():
    with pytest.raises(ValueError, match="p=-1.0"):
        AdamPower(_params(), p=-1.0)
