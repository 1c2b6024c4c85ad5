"""clip_and_power_: the fused routes equal "phi, then torch.nn.utils.clip_grad_norm_, then the step": on a CPU the
norm pass writes phi and the step applies the clip coefficient; on accelerators (Triton, run here by its
interpreter) the norm pass only reads and the step applies phi and the coefficient.

Tolerances (fp32 gradients, CPU): phi has the same bits on both routes (same kernel); the norms differ by the
float32 reduction of torch's norm (ours sums the squares in float64), measured <= 2e-7 relative here, asserted
<= 1e-6. That difference reaches the update through the clip coefficient and, for AdamPower, the one-pass C
AdamW against torch's AdamW: optimizer state (exp_avg, exp_avg_sq, momentum) within 1e-5 of each tensor's
largest entry (m's terms cancel where it crosses zero, so a pointwise relative bound means nothing), parameters
within 1e-6 absolute after 2 steps of lr 1e-3. MuonPower's parameters within 2 steps x lr x 2e-2 (Newton-Schulz
runs in bf16: a rounding flip per step), its momentum as the other states. bf16 gradients: torch clips bf16
gradients with a bf16 norm and coefficient (and the reference rounds phi to bf16 before that), so its update
carries about four bf16 roundings (2^-9 each) and ours two: norms within 2^-7 relative, states within 2^-5 of
each tensor's largest entry (measured up to 1.5%), bf16 parameters within 2^-6 relative (two rounding flips of
the parameter in 2 steps) or one lr where the parameter is smaller than the update.
p = 1: bit-identical (torch's clipping runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import patterned_tokens, tiny_llama

import hf_gradpower as gp
from hf_gradpower.trainer import GradPowerTrainer, GradPowerTrainingArguments

LR, STEPS = 1e-3, 2
KINDS = ("adampower", "muonpower", "adamw+attach", "sgd+attach")


def build(kind: str, model, p: float, fused: bool | None = None):
    if kind == "sgd+attach":
        return gp.attach(torch.optim.SGD(model.parameters(), lr=LR * 10, momentum=0.9), p)
    if kind == "adamw+attach":
        return gp.attach(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=fused), p)
    return gp.build_optimizer(model, kind, lr=LR, weight_decay=0.1, p=p)


def gradient_sets(model, steps: int, dtype=torch.float32, seed: int = 0) -> list[list[torch.Tensor]]:
    """Gradient-like values (each tensor its own scale, 1e-6..1e-1) for every step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([(torch.randn(q.shape, generator=g) * 10.0 ** torch.empty(()).uniform_(-6, -1, generator=g))
                    .to(dtype) for q in model.parameters()])  # fmt: skip
    return out


def set_grads(model, grads):
    for q, g in zip(model.parameters(), grads, strict=True):
        q.grad = g.clone()


def reference_step(model, opt, max_norm):
    gp.apply_now(opt)
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    opt.step()
    return norm


def fused_step(model, opt, max_norm):
    norm = gp.clip_and_power_(opt, max_norm)
    opt.step()
    return norm


def states(opt):
    return [t for s in opt.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"]


def run(kind, p, max_norm, dtype, step_fn):
    model = tiny_llama().to(dtype)
    opt = build(kind, model, p)
    norms = []
    for grads in gradient_sets(model, STEPS, dtype):
        set_grads(model, grads)
        norms.append(step_fn(model, opt, max_norm))
        opt.zero_grad()
    return model, opt, torch.stack([n.float() for n in norms])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("p", [0.8, 1.0, 1.2, 1.5])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_route_equals_phi_then_clip_grad_norm_then_step(kind, p, max_norm, dtype):
    ref_model, ref_opt, ref_norms = run(kind, p, max_norm, dtype, reference_step)
    model, opt, norms = run(kind, p, max_norm, dtype, fused_step)
    pairs = list(zip(states(opt), states(ref_opt), strict=True)) + list(
        zip(model.parameters(), ref_model.parameters(), strict=True))  # fmt: skip
    if p == 1.0:  # torch's own clipping and step: the same bits
        assert torch.equal(norms, ref_norms) and all(torch.equal(a, b) for a, b in pairs)
        return
    bf16 = dtype == torch.bfloat16
    assert (
        (norms > 1e-3).all() if max_norm < 1 else (norms < 1e3).all()
    )  # clipping active / inactive as named
    torch.testing.assert_close(norms, ref_norms, rtol=2.0**-7 if bf16 else 1e-6, atol=0)
    for got, want in zip(states(opt), states(ref_opt), strict=True):
        rel = (
            2.0**-5 if bf16 else 1e-5
        )  # of the tensor's largest entry: m's terms cancel where it crosses zero
        torch.testing.assert_close(
            got.float(), want.float(), rtol=0, atol=rel * want.float().abs().max().item()
        )
    param_tol = STEPS * LR * 2e-2 if kind == "muonpower" else 1e-6
    for got, want in zip(model.parameters(), ref_model.parameters(), strict=True):
        tol = dict(rtol=2.0**-6, atol=LR) if bf16 else dict(rtol=0, atol=param_tol)
        torch.testing.assert_close(got.detach().float(), want.detach().float(), **tol)


TRITON_SCRIPT = """
import json, sys, torch
from hf_gradpower.kernels import dispatch
from tests.test_clipping import STEPS, fused_step, reference_step, run, states
out = {}
for kind in ("adampower", "muonpower"):
    ref_model, ref_opt, ref_norms = run(kind, 1.2, 1e-3, torch.float32, reference_step)
    model, opt, norms = run(kind, 1.2, 1e-3, torch.float32, fused_step)
    pairs = zip(model.parameters(), ref_model.parameters(), strict=True)
    out[kind] = {
        "backend": dispatch.backend_name(torch.zeros(4)),
        "norm_rel": ((norms - ref_norms).abs() / ref_norms).max().item(),
        "state": max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(states(opt), states(ref_opt))),
        "param_abs": max((a - b).abs().max().item() for a, b in pairs),
    }
print(json.dumps(out))
"""


def test_fused_route_on_the_triton_backend_equals_the_reference():
    """The accelerator route, run by Triton's interpreter on CPU tensors: the norm from the read-only Triton pass,
    the coefficient inside the AdamW kernel / the Muon momentum kernel. Same tolerances as fp32 on CPU. In a
    fresh process: the interpreter must be on before triton is first imported (its tl.sum is a jit function)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():  # AdamPower, MuonPower
        assert r["backend"] == "triton"
        assert r["norm_rel"] <= 1e-6 and r["state"] <= 1e-5, (kind, r)
        assert r["param_abs"] <= (STEPS * LR * 2e-2 if kind == "muonpower" else 1e-6), (kind, r)


@pytest.mark.parametrize("kind", ["adampower", "sgd+attach", "adamw+attach"])
def test_the_clip_coefficient_reaches_the_update(kind):
    """Clipping to 1e-3 changes the step: the fused route is not merely the unclipped one (the test can fail)."""
    _, clipped_opt, _ = run(kind, 1.2, 1e-3, torch.float32, fused_step)
    _, free_opt, _ = run(kind, 1.2, 1e3, torch.float32, fused_step)
    gap = max((a - b).abs().max().item() / b.abs().max().item()
              for a, b in zip(states(clipped_opt), states(free_opt), strict=True))  # fmt: skip
    assert gap > 0.5


@pytest.mark.parametrize("route", ["write-once", "read-only"])
def test_the_norm_is_that_of_phi_and_on_a_cpu_phi_is_written_once(route):
    """CPU gradients: the norm pass writes phi (arithmetic, not bytes, bounds a CPU core), exactly what phi alone
    writes, and the step does not apply it again. With a loss scale still on the gradients the pass only reads
    them, as on accelerators."""
    model = tiny_llama()
    opt = build("adampower", model, 1.5)
    scale = None if route == "write-once" else torch.tensor(1.0)
    set_grads(model, gradient_sets(model, 1)[0])
    before = [q.grad.clone() for q in model.parameters()]
    norm = gp.clip_and_power_(opt, 1e-3, grad_scale=scale)
    want = torch.stack([gp.sign_power(g, 1.5).double().norm() for g in before]).norm()
    assert norm.item() == pytest.approx(want.item(), rel=1e-6)
    expected = [gp.sign_power(b, 1.5) if scale is None else b for b in before]
    assert all(torch.equal(q.grad, e) for q, e in zip(model.parameters(), expected, strict=True))


@pytest.mark.parametrize("kind", ["adampower", "adamw+attach", "sgd+attach"])
def test_max_norm_zero_means_no_clipping(kind):
    """max_norm <= 0: the norm is returned, the step is the plain GradPower step (phi, no coefficient)."""
    a_model, a_opt, norms = run(kind, 1.2, 0.0, torch.float32, fused_step)
    b_model, b_opt, _ = run(
        kind, 1.2, 0.0, torch.float32, lambda model, opt, _: opt.step() or torch.zeros(())
    )
    assert (norms > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(a_model.parameters(), b_model.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["adampower", "adamw-fused+attach", "sgd+attach"])
def test_grad_scaler_with_an_inf_step_equals_the_reference(kind):
    """fp16 loss scaling (GradScaler, scale carried by the gradients at clipping time) with an inf gradient at
    step 2: that step is skipped on both routes (parameters and state unchanged, scale backed off), and every
    other step matches "unscale_, phi, clip_grad_norm_, step". Fused AdamW unscales inside its kernel, so its
    step pre-hook receives the scale: s * coef * phi(g / s)."""
    fused = kind.startswith("adamw-fused")
    kind = "adamw+attach" if fused else kind

    def train(route):
        model = tiny_llama()
        opt = build(kind, model, 1.2, fused=fused or None)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        scaler.scale(torch.ones(()))  # creates the scale tensor
        snapshots = []
        for i, grads in enumerate(gradient_sets(model, 4)):
            if i == 2:
                grads[3] = grads[3].clone()
                grads[3].view(-1)[5] = float("inf")
            set_grads(model, [g * scaler.get_scale() for g in grads])
            if route == "fused":
                gp.clip_and_power_(opt, 1e-3, grad_scale=scaler._get_scale_async())
            else:
                scaler.unscale_(opt)
                gp.apply_now(opt)
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e-3)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            snapshots.append([q.detach().clone() for q in model.parameters()])
        return snapshots, scaler.get_scale()

    fused_run, fused_scale = train("fused")
    ref_run, ref_scale = train("reference")
    assert fused_scale == ref_scale < 2.0**12 * 4  # the inf step backed the scale off on both routes
    assert all(torch.equal(a, b) for a, b in zip(fused_run[2], fused_run[1], strict=True))  # step 2 skipped
    for got_step, want_step in zip(fused_run, ref_run, strict=True):
        for got, want in zip(got_step, want_step, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_coefficient_left_by_a_skipped_step_never_reaches_a_later_one():
    """GradScaler skipped the step that should have taken the coefficient; the next call (here without
    clipping) must not let it through: the step equals a plain GradPower step."""
    model, plain = tiny_llama(), tiny_llama()
    opt, plain_opt = build("adampower", model, 1.2), build("adampower", plain, 1.2)
    grads = gradient_sets(model, 1)[0]
    set_grads(model, grads)
    gp.clip_and_power_(opt, 1e-3)  # its step is "skipped": never taken
    set_grads(model, grads)  # the next backward pass
    gp.clip_and_power_(opt, 0.0)
    opt.step()
    set_grads(plain, grads)
    plain_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))


def test_clip_and_power_after_apply_now_is_refused():
    model = tiny_llama()
    opt = build("adampower", model, 1.2)
    set_grads(model, gradient_sets(model, 1)[0])
    gp.apply_now(opt)
    with pytest.raises(ValueError, match="apply_now already wrote phi"):
        gp.clip_and_power_(opt, 1.0)
    with pytest.raises(ValueError, match="max_norm must be a number"):
        gp.clip_and_power_(opt, float("nan"))


def test_gradient_accumulation_in_a_custom_loop_applies_phi_once_to_the_sum():
    """Two micro-batches accumulate into .grad; clip_and_power_ then the step see their sum once."""
    data = patterned_tokens(8, 12, seed=2).view(2, 4, 12)
    a, b = tiny_llama(), tiny_llama()
    opt_a, opt_b = build("adampower", a, 1.3), build("adampower", b, 1.3)
    for batch in data:
        (a(input_ids=batch, labels=batch).loss / 2).backward()
    gp.clip_and_power_(opt_a, 0.05)
    opt_a.step()
    (b(input_ids=data.view(8, 12), labels=data.view(8, 12)).loss).backward()
    reference_step(b, opt_b, 0.05)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-6)


class PhiThenTrainerClipping(GradPowerTrainer):
    """The reference route inside Trainer: phi written into the gradients (apply_now), then Trainer's clipping."""

    def _clips_with_power(self, model) -> bool:
        return False


def trainer_run(cls, tmp_path, **kw):
    rows = patterned_tokens(48, 12, seed=4)
    args = GradPowerTrainingArguments(**{
        "output_dir": str(tmp_path / cls.__name__), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
        "max_steps": 4, "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
        "data_seed": 0, "lr_scheduler_type": "constant", "weight_decay": 0.1, "disable_tqdm": True, **kw})  # fmt: skip
    trainer = cls(model=tiny_llama(), args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, [h["loss"] for h in logs], [h["grad_norm"] for h in logs]


@pytest.mark.parametrize("optim", ["adampower", "muonpower", "sgdpower"])
def test_trainer_default_order_takes_the_fused_route_and_matches_phi_then_trainer_clipping(tmp_path, optim):
    """GradPowerTrainer's default (before_clip), with gradient accumulation (2 micro-batches) and active clipping:
    the logged grad_norm is that of phi(g), and losses, norms and parameters equal the apply_now route."""
    kw = dict(optim=optim, gradpower_p=1.3, max_grad_norm=0.05, gradient_accumulation_steps=2)
    fused, losses, norms = trainer_run(GradPowerTrainer, tmp_path, **kw)
    ref, ref_losses, ref_norms = trainer_run(PhiThenTrainerClipping, tmp_path, **kw)
    assert fused._clips_with_power(fused.model) and min(ref_norms) > 0.05  # fused route; clipping active
    # Muon: a bf16 rounding flip in Newton-Schulz changes the later gradients a little
    rel = 1e-4 if optim == "muonpower" else 1e-6
    assert norms[0] == pytest.approx(ref_norms[0], rel=1e-6)
    assert norms == pytest.approx(ref_norms, rel=rel) and losses == pytest.approx(ref_losses, rel=rel)
    tol = 4 * 3e-3 * 2e-2 if optim == "muonpower" else 1e-5  # 4 steps of lr 3e-3, the Muon bound above
    for a, b in zip(fused.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=tol)


def test_trainer_with_p_one_keeps_trainer_clipping_bit_for_bit(tmp_path):
    """p = 1: Trainer's own clipping and AdamW, the same bits as the baseline optimizer."""
    _, losses, norms = trainer_run(
        GradPowerTrainer, tmp_path, optim="adampower", gradpower_p=1.0, max_grad_norm=0.05
    )
    _, base_losses, base_norms = trainer_run(
        PhiThenTrainerClipping, tmp_path / "b", optim="adamw", max_grad_norm=0.05
    )
    assert losses == base_losses and norms == base_norms


def test_clipped_step_benchmark_times_every_route_and_names_the_cpu(tmp_path):
    from benchmarks import clipped_step

    result = clipped_step.main(["--device", "cpu", "--smoke", "--threads", "1", "--steps", "2", "--warmup", "0",
                                "--variants", "eager", "--out", str(tmp_path)])  # fmt: skip
    rows = result["threads"]["1"]["rows"]
    assert {
        "adamw",
        "sgd",
        "adampower[eager-torch]",
        "adampower-apply_now[eager-torch]",
        "sgdpower[eager-torch]",
    } <= set(rows)
    assert set(result["threads"]["1 muon"]["rows"]) == {"muon", "muonpower"}
    assert "**Muon, 1 thread**" in (tmp_path / "clipped_step_cpu_smoke.md").read_text()
    assert set(clipped_step.ratios(result["threads"]["1"])) == {k for k in rows if "power" in k}
    report = (tmp_path / "clipped_step_cpu_smoke.md").read_text()
    assert result["cpu"] in report and "adampower-apply_now" in report
