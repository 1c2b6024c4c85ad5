"""GradPower attached to torch optimizers: exactness, once-per-step, AMP, checkpoints."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from accelerate import Accelerator
from conftest import patterned_tokens, tiny_llama

import hf_gradpower as gp


def phi_reference(g: torch.Tensor, p: float) -> torch.Tensor:
    """The paper's one line, evaluated in float64."""
    g = g.double()
    return (torch.sign(g) * g.abs().pow(p)).float()


def run_steps(model, optimizer, steps=20, before_step=None, seed=0):
    """Train ``steps`` steps on fixed batches; returns the losses."""
    data = patterned_tokens(steps * 4, 12, seed=seed).view(steps, 4, 12)
    losses = []
    for batch in data:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if before_step is not None:
            before_step(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a, b, **tol):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        if tol:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("fused", [True, False])
def test_p_one_is_bit_identical_to_bare_adamw(fused):
    bare, powered = tiny_llama(), tiny_llama()
    opt_bare = torch.optim.AdamW(bare.parameters(), lr=3e-3, weight_decay=0.1, fused=fused)
    opt_pow = gp.attach(torch.optim.AdamW(powered.parameters(), lr=3e-3, weight_decay=0.1, fused=fused), p=1.0)
    assert run_steps(bare, opt_bare) == run_steps(powered, opt_pow)
    assert_same_params(bare, powered)


def test_adampower_equals_hand_written_loop():
    """build_optimizer('adampower') == (phi by the formula, then torch AdamW), step for step."""
    ours, ref = tiny_llama(), tiny_llama()
    opt = gp.build_optimizer(ours, "adampower", lr=3e-3, weight_decay=0.1, p=1.2, betas=(0.9, 0.95))
    ref_groups = [
        {"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    ref_opt = torch.optim.AdamW(ref_groups, lr=3e-3, betas=(0.9, 0.95))

    def phi_by_hand(model):
        for p in model.parameters():
            p.grad.copy_(phi_reference(p.grad, 1.2))

    losses = run_steps(ours, opt)
    ref_losses = run_steps(ref, ref_opt, before_step=phi_by_hand)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert_same_params(ours, ref, rtol=1e-5, atol=1e-6)
    # and GradPower really changed the trajectory
    plain = tiny_llama()
    plain_losses = run_steps(plain, torch.optim.AdamW(plain.parameters(), lr=3e-3, betas=(0.9, 0.95)))
    assert abs(plain_losses[-1] - losses[-1]) > 1e-3


def test_gradient_accumulation_applies_power_once_per_step():
    """Accelerate with 2 accumulation steps: the update is lr * phi(g1 + g2), not lr * (phi(g1) + phi(g2)).

    SGD makes the update linear in phi (Adam's first step is sign-like and would hide the difference).
    """
    lr, p = 0.5, 1.5
    model, ref = tiny_llama(), tiny_llama()
    start = params_of(ref)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = gp.build_optimizer(model, "sgdpower", lr=lr, p=p)
    model, opt = accelerator.prepare(model, opt)
    batches = patterned_tokens(4, 12).view(2, 2, 12)
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=batch, labels=batch).loss)
            opt.step()
            opt.zero_grad()
    got = params_of(accelerator.unwrap_model(model))

    micro = []
    for b in batches:
        ref.zero_grad()
        (ref(input_ids=b, labels=b).loss / 2).backward()
        micro.append([q.grad.clone() for q in ref.parameters()])
    once = [w - lr * phi_reference(g1 + g2, p) for w, g1, g2 in zip(start, *micro, strict=True)]
    twice = [w - lr * (phi_reference(g1, p) + phi_reference(g2, p)) for w, g1, g2 in zip(start, *micro, strict=True)]
    for g, o in zip(got, once, strict=True):
        torch.testing.assert_close(g, o, rtol=1e-5, atol=1e-7)
    assert max((t - o).abs().max().item() for t, o in zip(twice, once, strict=True)) > 1e-4


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True),
], ids=["adamw-fused", "adamw-foreach", "sgd-fused"])
def test_loss_scaled_gradients_match_fp32_reference(make_opt):
    """GradScaler (scale 2^10, growing): the update equals the unscaled fp32 run.

    Fused optimizers unscale inside their kernel, so the pre-step hook sees s*g and must undo it.
    Powers of two make the scaling exact, so the tolerance is fp32 rounding only.
    """
    torch.manual_seed(0)
    w_amp = torch.nn.Parameter(torch.randn(64, 32) * 0.1)
    w_ref = torch.nn.Parameter(w_amp.detach().clone())
    opt_amp, opt_ref = gp.attach(make_opt([w_amp]), 1.2), gp.attach(make_opt([w_ref]), 1.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x = torch.randn(5, 16, 32, generator=torch.Generator().manual_seed(1))
    for xb in x:
        scaler.scale(((xb @ w_amp.t()) ** 2).mean()).backward()
        scaler.step(opt_amp)
        scaler.update()
        opt_amp.zero_grad()
        ((xb @ w_ref.t()) ** 2).mean().backward()
        opt_ref.step()
        opt_ref.zero_grad()
    assert scaler.get_scale() > 2.0**10  # the scale changed during the run
    torch.testing.assert_close(w_amp, w_ref, rtol=1e-6, atol=1e-7)


def test_step_skipped_by_grad_scaler_on_inf_leaves_everything_unchanged():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = gp.attach(torch.optim.AdamW([w], lr=0.1, fused=True), 1.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((w * torch.tensor(float("inf"))).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(4, 4))
    assert scaler.get_scale() == 2.0  # GradScaler saw the inf and backed off


def test_power_survives_state_dict_deepcopy_and_pickle():
    model = tiny_llama()
    opt = gp.build_optimizer(model, "adampower", lr=1e-3, p=1.3)
    run_steps(model, opt, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    fresh = gp.build_optimizer(model, "adampower", lr=1e-3)  # re-created with the default p
    fresh.load_state_dict(torch.load(buffer))
    assert gp.gradpower_p(fresh) == 1.3
    assert gp.gradpower_p(copy.deepcopy(opt)) == 1.3
    assert gp.gradpower_p(pickle.loads(pickle.dumps(opt))) == 1.3


def test_deepcopied_optimizer_still_applies_power():
    model = tiny_llama()
    opt = gp.attach(torch.optim.AdamW(model.parameters(), lr=3e-3), 1.2)
    twin, twin_opt = copy.deepcopy((model, opt))  # per-instance hooks would be lost here
    bare = copy.deepcopy(model)
    losses = run_steps(model, opt, steps=5)
    assert run_steps(twin, twin_opt, steps=5) == losses
    assert run_steps(bare, torch.optim.AdamW(bare.parameters(), lr=3e-3), steps=5) != losses


@pytest.mark.parametrize("base", ["adamw", "muon"])
def test_a_baseline_loading_a_gradpower_checkpoint_stays_the_baseline(base, caplog):
    powered_model = tiny_llama()
    powered = gp.build_optimizer(powered_model, base + "power", lr=3e-3, p=1.3)
    run_steps(powered_model, powered, steps=2)
    checkpoint = copy.deepcopy(powered.state_dict())
    assert all(g["gradpower_p"] == 1.3 for g in checkpoint["param_groups"])

    def resumed(strip: bool):
        model = copy.deepcopy(powered_model)
        opt = gp.build_optimizer(model, base, lr=3e-3)  # the user built a baseline
        state = copy.deepcopy(checkpoint)
        if strip:
            for group in state["param_groups"]:
                del group["gradpower_p"]
        opt.load_state_dict(state)
        return model, opt

    model, opt = resumed(strip=False)
    assert gp.gradpower_p(opt) is None and not gp.is_attached(opt)
    with caplog.at_level("WARNING", logger="hf_gradpower.attach"):
        losses = run_steps(model, opt, steps=3)
    warnings = [r.getMessage() for r in caplog.records if "stays the baseline" in r.getMessage()]
    assert len(warnings) == 1 and "p=1.3" in warnings[0] and "attach" in warnings[0]
    assert all("gradpower_p" not in g for g in opt.state_dict()["param_groups"])  # its own checkpoints are clean
    reference_model, reference = resumed(strip=True)
    assert run_steps(reference_model, reference, steps=3) == losses
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)  # bit-identical to the baseline: phi never ran


def test_attached_p_is_kept_when_loading_a_plain_checkpoint():
    model = tiny_llama()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_steps(model, plain, steps=1)
    powered = gp.attach(torch.optim.AdamW(model.parameters(), lr=1e-3), 1.2)
    powered.load_state_dict(plain.state_dict())
    assert gp.gradpower_p(powered) == 1.2


def test_optimizer_keeps_its_class_and_works_with_schedulers_and_accelerate():
    model = tiny_llama()
    opt = gp.attach(torch.optim.AdamW(model.parameters(), lr=1e-3), 1.2)
    assert type(opt) is torch.optim.AdamW
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    run_steps(model, opt, steps=2)
    sched.step()
    assert gp.gradpower_p(opt) == 1.2
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_registry_combines_any_base_optimizer_with_power():
    model, ref = tiny_llama(), tiny_llama()
    opt = gp.build_optimizer(model, "sgdpower", lr=0.1, p=1.5, momentum=0.9)
    assert type(opt) is torch.optim.SGD and gp.gradpower_p(opt) == 1.5
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)

    def phi_by_hand(m):
        for p in m.parameters():
            p.grad.copy_(phi_reference(p.grad, 1.5))

    run_steps(model, opt, steps=3)
    run_steps(ref, ref_opt, steps=3, before_step=phi_by_hand)
    assert_same_params(model, ref, rtol=1e-5, atol=1e-6)
    assert "adagradpower" in gp.available_optimizers()
    assert gp.gradpower_p(gp.build_optimizer(tiny_llama(), "adamw", lr=1e-3)) is None


def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'adampwoer'.*adampower"):
        gp.build_optimizer(tiny_llama(), "adampwoer", lr=1e-3)


def test_attach_rejects_bad_p_and_non_optimizers():
    with pytest.raises(ValueError, match="p=0.0"):
        gp.attach(torch.optim.SGD(tiny_llama().parameters(), lr=0.1), 0.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gp.attach(object(), 1.2)


def test_power_before_clipping_on_loss_scaled_gradients():
    """The Trainer's before_clip path under fp16: apply_now on s*g, then unscale_, clip, scaler.step.

    Must equal clip(phi(g)) from an fp32 loop (SGD: the update is linear in it, so errors show).
    """
    torch.manual_seed(0)
    w_amp = torch.nn.Parameter(torch.randn(32, 16) * 0.1)
    w_ref = torch.nn.Parameter(w_amp.detach().clone())
    opt_amp = gp.attach(torch.optim.SGD([w_amp], lr=0.5), 1.3)
    opt_ref = torch.optim.SGD([w_ref], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    for xb in x:
        scaler.scale(((xb @ w_amp.t()) ** 2).mean()).backward()
        gp.apply_now(opt_amp, grad_scale=scaler._get_scale_async())
        scaler.unscale_(opt_amp)
        torch.nn.utils.clip_grad_norm_([w_amp], 0.01)
        scaler.step(opt_amp)
        scaler.update()
        opt_amp.zero_grad()

        ((xb @ w_ref.t()) ** 2).mean().backward()
        w_ref.grad = phi_reference(w_ref.grad, 1.3)
        torch.nn.utils.clip_grad_norm_([w_ref], 0.01)
        opt_ref.step()
        opt_ref.zero_grad()
    torch.testing.assert_close(w_amp, w_ref, rtol=1e-5, atol=1e-7)
