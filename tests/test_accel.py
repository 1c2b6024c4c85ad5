"""The accelerator (Triton) path, run on CPU by Triton's interpreter, against float64 references.

Tolerances: phi is checked in ulps of the storage dtype (fp32: <= 4 ulp, the bound the CPU kernel also
meets; bf16/fp16: <= 1 ulp, i.e. fp32 math rounded once — the interpreter rounds half away from zero, GPUs
to nearest even). Optimizer states are checked against torch's AdamW / Muon on phi(g) with ``k * eps``
relative to each tensor's largest value (k = 4 for fp32; one ulp for bf16 against a float64 step).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the accelerator path needs triton (pip install triton; Linux)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import hf_gradpower as gp  # noqa: E402
from hf_gradpower.adampower import one_pass_step  # noqa: E402
from hf_gradpower.kernels import dispatch, eager  # noqa: E402
from hf_gradpower.kernels import triton as triton_backend  # noqa: E402
from hf_gradpower.kernels.cpu import max_ulp_error  # noqa: E402
from hf_gradpower.kernels.selfcheck import phi64, scaled_error, ulps  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = "hf_gradpower.kernels._triton_jit"


def assert_close_scaled(x: torch.Tensor, ref: torch.Tensor, k: float) -> None:
    """|x - ref| <= k * eps(x.dtype) * max|ref| elementwise."""
    bound = k * torch.finfo(x.dtype).eps * ref.double().abs().max().item()
    assert (x.double() - ref.double()).abs().max().item() <= bound


def _emulate_fp32_arguments(monkeypatch) -> None:
    """Python floats reach a GPU kernel as float32 parameters; the interpreter keeps them as doubles. Rounding
    every float argument to float32 at the launch makes the interpreter see what a GPU sees."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        args = [float(np.float32(a)) if type(a) is float else a for a in args]
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)


@pytest.fixture
def fp32_kernel_arguments(monkeypatch):
    _emulate_fp32_arguments(monkeypatch)


def _second_moment_with_one_minus_beta2_in_kernel(v_ptr, g_ptr, n, beta2, BLOCK: tl.constexpr):
    """exp_avg_sq's update with ``1 - beta2`` computed inside the kernel (from a float32 beta2 on a GPU)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    v = tl.load(v_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    tl.store(v_ptr + offsets, v * beta2 + (1.0 - beta2) * (g * g), mask=mask)


def test_fp32_argument_emulation_catches_one_minus_beta_rounded_in_fp32(interpreter, monkeypatch):
    """``1 - beta2`` formed in the kernel: invisible to the plain interpreter (doubles), ~100 eps from torch
    once the arguments are float32 as on a GPU. The kernels therefore take ``1 - beta`` from the host."""
    kernel = triton.jit(_second_moment_with_one_minus_beta2_in_kernel)  # defined now: TRITON_INTERPRET=1 makes it interpreted
    gen = torch.Generator().manual_seed(0)
    v0, g = torch.zeros(3000), torch.randn(3000, generator=gen) * 1e-3  # the first step
    reference = v0.double() * 0.999 + (1 - 0.999) * g.double() ** 2
    errors = []
    for emulate in (False, True):
        if emulate:
            _emulate_fp32_arguments(monkeypatch)
        v = v0.clone()
        kernel[(3,)](v, g, 3000, 0.999, BLOCK=1024)
        errors.append(scaled_error(v, reference))
    assert errors[0] <= 2 and errors[1] > 50, errors


def test_takes_triton_path_only_on_accelerators_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_backend.takes(torch.ones(3))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.takes(torch.ones(3))
    assert not triton_backend.takes(torch.ones(3, dtype=torch.float64))  # fp64 keeps the eager path
    assert not triton_backend.takes(torch.ones(3, device="meta"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.8, 1.2, 1.5])
def test_phi_matches_float64_reference(interpreter, dtype, p):
    gen = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-4, -7.0, 1e-40, -3e-39])
    if dtype == torch.bfloat16:  # the interpreter flushes bf16 subnormals on load (GPUs do not): fp32 covers them
        specials = specials[:-2]
    grads = [  # several tensors, sizes around the block size, one transposed (non-contiguous): one launch
        (torch.randn(2500, generator=gen) * 10 ** torch.empty(2500).uniform_(-6, 1, generator=gen)).to(dtype),
        torch.randn(33, 40, generator=gen).to(dtype).t(),
        specials.to(dtype),
        torch.randn(0).to(dtype),
    ]
    refs = [phi64(g, p) for g in grads]
    gp.power_(grads, p)
    for g, ref in zip(grads, refs, strict=True):
        assert g.dtype == dtype
        assert ulps(g, ref) <= (4.0 if dtype == torch.float32 else 1.0)
    special_out = grads[2]
    assert torch.equal(special_out[:4].signbit(), specials[:4].signbit()) and special_out[4].isnan()
    if dtype == torch.float32 and p < 1:
        assert special_out[7].item() == pytest.approx(1e-40**p, rel=1e-6)  # a subnormal g: exact p-form


def test_phi_meets_its_stated_ulp_bound_over_p_in_the_interpreter(interpreter):
    """triton.ULP_BOUND (fp32, 0 < p <= 4; the C kernel's error unit) on random bit patterns of every binade, gradient-like values and
    subnormals, p from 0.2 to 4. phi is correctly rounded fp32 operations only, so a GPU computes the same."""
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(1, 0x7F800000, (4000,), generator=gen, dtype=torch.int32).view(torch.float32)
    grads = torch.randn(4000, generator=gen) * 10.0 ** torch.empty(4000).uniform_(-9, 1, generator=gen)
    x = torch.cat([bits, -bits[:1000], grads, torch.tensor([3.4028235e38, -1.1754942e-38, 1.4e-45])])
    worst = (0.0, None)
    for p in (0.2, 0.5, 0.8, 0.95, 1.05, 1.2, 1.5, 2.0, 3.0, 3.9, 4.0):
        y = x.clone()
        triton_backend.phi_([y], p)
        worst = max(worst, (max_ulp_error(x, y, p), p))
    assert worst[0] <= triton_backend.ULP_BOUND, worst


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_loss_scaled_gradient_gives_the_unscaled_result(interpreter, dtype, scale_kind):
    """power_(s*g, grad_scale=s) / s == phi(g): the scale is one factor s**(1-p) inside the kernel."""
    p, s = 1.2, 1024.0
    g = (torch.randn(3000, generator=torch.Generator().manual_seed(1)) * 1e-3).to(dtype)
    scaled = (g.double() * s).to(dtype)  # exact: s is a power of two
    gp.power_([scaled], p, grad_scale=torch.tensor(s) if scale_kind == "tensor" else s)
    assert ulps(scaled, phi64(g, p) * s) <= (4.0 if dtype == torch.float32 else 1.0)


def _adamw_pair(param_dtype, p, shapes, beta2=0.95):
    torch.manual_seed(0)
    init = [torch.randn(s).to(param_dtype) for s in shapes]
    fused = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, beta2), eps=1e-8)
    return fused, ref, gp.AdamPower(fused, p=p, **kwargs), torch.optim.AdamW(ref, foreach=False, **kwargs)


@pytest.mark.parametrize("p", [0.8, 1.2, 1.5, 1.0])
@pytest.mark.parametrize("beta2", [0.95, 0.999, 0.9999])
def test_fused_adampower_equals_phi_then_torch_adamw(interpreter, fp32_kernel_arguments, p, beta2):
    """Three steps with a changing lr, the kernel's float arguments in float32 as on a GPU: params and state
    within 4 eps of torch AdamW on phi(g) (fp32) at beta2 = 0.95, 0.999 (torch's default), 0.9999."""
    shapes = [(33, 17), (5,), (2100,)]
    fused, ref, opt, ref_opt = _adamw_pair(torch.float32, p, shapes, beta2)
    for _ in range(3):
        grads = [torch.randn(s) * 1e-3 for s in shapes]
        for q, r, g in zip(fused, ref, grads, strict=True):
            q.grad, r.grad = g.clone(), phi64(g, p).float()
        if p == 1.0:  # AdamPower at p = 1 is torch's own step (bit-identical); here: the kernel without phi
            assert one_pass_step(opt, opt.param_groups[0], 1.0)
        else:
            opt.step()
        ref_opt.step()
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] *= 0.7
    for q, r in zip(fused, ref, strict=True):
        assert_close_scaled(q.detach(), r.detach(), 4)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_scaled(opt.state[q][key], ref_opt.state[r][key], 4)
        assert opt.state[q]["step"].item() == ref_opt.state[r]["step"].item() == 3
    assert opt.state_dict()["state"][0].keys() == ref_opt.state_dict()["state"][0].keys()
    assert torch.equal(fused[2].grad, grads[2])  # .grad left as g (not phi(g)), like the CPU one-pass


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_fused_adampower_bf16_params_one_step_vs_float64(interpreter, grad_dtype):
    """bf16 params and state: each step's fp32 math rounded once, <= 1 bf16 ulp from the float64 step."""
    p, lr, wd, b1, b2, eps = 1.2, 1e-2, 0.1, 0.9, 0.95, 1e-8
    param = torch.nn.Parameter(torch.randn(3000).bfloat16())
    opt = gp.AdamPower([param], lr=lr, p=p, weight_decay=wd, betas=(b1, b2), eps=eps)
    for step in range(1, 4):
        g = (torch.randn(3000) * 1e-3).to(grad_dtype)
        if grad_dtype != param.dtype:
            param.grad_dtype = grad_dtype  # fp32 gradients of bf16 parameters (mixed-precision training)
        param.grad = g
        x0 = param.detach().double()
        m0, v0 = (opt.state[param][k].double() if opt.state else torch.zeros(3000, dtype=torch.float64)
                  for k in ("exp_avg", "exp_avg_sq"))  # fmt: skip
        opt.step()
        h = phi64(g, p)
        m = m0 + (1 - b1) * (h - m0)
        v = b2 * v0 + (1 - b2) * h * h
        x = x0 * (1 - lr * wd) - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + eps)
        assert opt.state[param]["exp_avg"].dtype == torch.bfloat16
        assert ulps(param.detach(), x) <= 1.0
        assert ulps(opt.state[param]["exp_avg"], m) <= 1.0
        assert ulps(opt.state[param]["exp_avg_sq"], v) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_fused_momentum_equals_phi_then_lerp(interpreter, fp32_kernel_arguments, dtype, nesterov):
    p, mu = 1.2, 0.95
    gen = torch.Generator().manual_seed(2)
    grad = (torch.randn(40, 60, generator=gen) * 1e-3).to(dtype)
    buf = (torch.randn(40, 60, generator=gen) * 1e-3).to(dtype)
    raw, buf0 = grad.clone(), buf.clone()
    update = triton_backend.muon_momentum_(grad, buf, mu, p, nesterov)
    assert torch.equal(grad, raw)  # g itself is not rewritten
    if dtype == torch.float32:  # against torch's own ops on phi(g)
        ref_grad, ref_buf = phi64(raw, p).float(), buf0.clone()
        ref_buf.lerp_(ref_grad, 1 - mu)
        assert_close_scaled(buf, ref_buf, 4)
        assert_close_scaled(update, ref_grad.lerp(ref_buf, mu) if nesterov else ref_buf, 4)
    else:  # low precision: fp32 math rounded once, <= 1 ulp from float64 (Nesterov from the stored buffer)
        h = phi64(raw, p)
        assert ulps(buf, buf0.double() + (1 - mu) * (h - buf0.double())) <= 1.0
        assert ulps(update, h + mu * (buf.double() - h) if nesterov else buf.double()) <= 1.0
    assert (update is buf) == (not nesterov)


def _train_muonpower(steps: int, apply_first: bool, fused: bool) -> list[torch.Tensor]:
    model = tiny_llama()
    opt = gp.build_optimizer(model, "muonpower", lr=2e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for q in model.parameters():
            q.grad = torch.randn(q.shape, generator=gen) * 1e-3
        assert opt.applies_gradpower_in_step == fused
        if apply_first:
            gp.apply_now(opt)
        opt.step()
    return [q.detach().clone() for q in model.parameters()]


@pytest.mark.parametrize("apply_first", [False, True])
def test_muonpower_fused_step_matches_the_hook_path(interpreter, monkeypatch, apply_first):
    """phi applied exactly once either way (fused into the momentum, or by apply_now / the hook)."""
    fused = _train_muonpower(1, apply_first, fused=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    hook = _train_muonpower(1, apply_first, fused=False)
    for a, b in zip(fused, hook, strict=True):  # Newton-Schulz runs in bf16: a 1-ulp change in phi can flip roundings
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * 2e-2)


def test_no_cpu_kernel_build_when_every_tensor_takes_the_triton_path():
    """AdamPower and power_ on Triton-path tensors never build or validate the CPU C kernel."""
    code = (
        "import torch, hf_gradpower as gp\n"
        "from hf_gradpower.kernels import cpu\n"
        "q = torch.nn.Parameter(torch.randn(64, 64)); q.grad = torch.randn(64, 64)\n"
        "opt = gp.AdamPower([q], lr=1e-3); opt.step(); gp.power_([q.grad], 1.2)\n"
        "assert opt.state[q]['step'].item() == 1\n"
        "print(cpu.kernel_info()['initialised'])\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.fixture
def compiled_kernels(monkeypatch):
    """The kernels module as a GPU would load it (no interpreter), restored afterwards."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    previous = sys.modules.pop(KERNELS, None)
    yield importlib.import_module(KERNELS)
    sys.modules.pop(KERNELS, None)
    if previous is not None:
        sys.modules[KERNELS] = previous


def test_kernels_compile_for_an_h100_with_exact_fp32_math_and_vector_loads(compiled_kernels):
    """Ahead-of-time compile for sm_90 (no GPU needed), with the launch's compile options: catches what the
    interpreter does not check. The PTX shows no float64, no approximate instruction (ex2/lg2/sqrt/rcp/div
    .approx, flush-to-zero), AdamW's sqrt and divide correctly rounded, 64-bit offsets in the Muon kernel,
    and 128-bit loads and stores for whole blocks."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    table = {"numel_ptr": "*i64", "block_tensor_ptr": "*i32", "first_block_ptr": "*i64"}
    powers = {n: "fp32" for n in ("qh", "ql", "ph", "pl")}
    phi = ASTSource(
        fn=compiled_kernels.phi_kernel,
        signature={"addr_ptr": "*i64", **table, "scale_ptr": "*fp32", "coef_ptr": "*fp32", **powers,
                   **dict.fromkeys(("HAS_SCALE", "HAS_COEF", "DTYPE", "ALIGNED", "BLOCK"), "constexpr")},
        constexprs={"HAS_SCALE": True, "HAS_COEF": True, "DTYPE": tl.bfloat16, "ALIGNED": True,
                    "BLOCK": triton_backend.BLOCK},
    )  # fmt: skip
    addresses = ("param_addr_ptr", "grad_addr_ptr", "exp_avg_addr_ptr", "exp_avg_sq_addr_ptr")
    adamw = ASTSource(
        fn=compiled_kernels.adamw_power_kernel,
        signature={**dict.fromkeys(addresses, "*i64"), **table, "step_hyper_ptr": "*fp32", "coef_ptr": "*fp32",
                   **powers, **dict.fromkeys(("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"), "fp32"),
                   **dict.fromkeys(("APPLY_PHI", "HAS_COEF", "PARAM_DTYPE", "GRAD_DTYPE", "ALIGNED", "BLOCK"),
                                   "constexpr")},
        constexprs={"APPLY_PHI": True, "HAS_COEF": True, "PARAM_DTYPE": tl.float32, "GRAD_DTYPE": tl.bfloat16, "ALIGNED": True,
                    "BLOCK": triton_backend.BLOCK},
    )  # fmt: skip
    muon = ASTSource(
        fn=compiled_kernels.muon_power_momentum_kernel,
        signature={"grad_ptr": "*bf16", "buf_ptr": "*fp32", "update_ptr": "*bf16", "coef_ptr": "*fp32",
                   "numel": "i64", "momentum": "fp32", "one_minus_momentum": "fp32", **powers,
                   **dict.fromkeys(("APPLY_PHI", "HAS_COEF", "NESTEROV", "BLOCK"), "constexpr")},
        constexprs={"APPLY_PHI": True, "HAS_COEF": True, "NESTEROV": True, "BLOCK": triton_backend.BLOCK},
    )  # fmt: skip
    target = GPUTarget("cuda", 90, 32)
    ptx = {name: triton.compile(source, target=target, options=triton_backend.EXACT).asm["ptx"]
           for name, source in (("phi", phi), ("adamw", adamw), ("muon", muon))}  # fmt: skip
    for name, code in ptx.items():  # floor (cvt.rmi) flushes subnormals: its argument y + 0.5 is never one
        assert ".f64" not in code and ".approx" not in code, name
        assert set(re.findall(r"[\w.]*\.ftz[\w.]*", code)) <= {"cvt.rmi.ftz.f32.f32"}, name
    for name in ("phi", "adamw"):
        assert "ld.global.v4.b32" in ptx[name] and "st.global.v4.b32" in ptx[name]
    assert "sqrt.rn.f32" in ptx["adamw"] and "div.rn.f32" in ptx["adamw"]
    assert "mul.wide.u32" in ptx["muon"]  # program_id * BLOCK widened to 64 bits


def test_dtensor_shards_take_the_same_fused_path(interpreter, cpu_mesh):
    """FSDP2-style DTensor parameters: AdamPower updates their local shards; same result as plain tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    init, grad = torch.randn(64, 8), torch.randn(64, 8) * 1e-3
    sharded = torch.nn.Parameter(distribute_tensor(init.clone(), cpu_mesh, [Shard(0)]))
    plain = torch.nn.Parameter(init.clone())
    sharded.grad, plain.grad = distribute_tensor(grad.clone(), cpu_mesh, [Shard(0)]), grad.clone()
    opts = [gp.AdamPower([q], lr=1e-2, weight_decay=0.1) for q in (sharded, plain)]
    for opt in opts:
        assert one_pass_step(opt, opt.param_groups[0], 1.2)  # the fused path, not a fallback
    assert type(opts[0].state[sharded]["exp_avg"]).__name__ == "DTensor"  # state as torch's AdamW keeps it
    assert torch.equal(sharded.full_tensor(), plain.detach())
    assert torch.equal(opts[0].state[sharded]["exp_avg_sq"].full_tensor(), opts[1].state[plain]["exp_avg_sq"])


def test_sum_of_squares_and_coef_match_the_eager_backend(interpreter):
    """The operations fused clipping builds on: per-tensor sums of squares of phi(g) (read only, with and
    without a loss scale), a 0-d coef multiplied into phi(g) inside the phi kernel (bit for bit phi, rounded to
    the storage dtype, then one float32 multiply rounded to it), the AdamW and the Muon momentum kernels."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(2500, generator=gen) * 1e-2, torch.randn(33, 40, generator=gen).t() * 1e-3,
             torch.randn(0), torch.randn(7, generator=gen).bfloat16()]  # fmt: skip
    originals = [g.clone() for g in grads]
    for scale in (None, 1024.0):
        got = triton_backend.phi_sum_sq(grads, 1.2, grad_scale=scale)
        want = torch.stack([eager.phi_sum_sq([g], 1.2, grad_scale=scale)[0] for g in grads])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        assert torch.equal(torch.stack(dispatch.phi_sum_sq(grads, 1.2, grad_scale=scale)), got)  # input order
    assert all(torch.equal(g, o) for g, o in zip(grads, originals, strict=True))
    coef = torch.tensor(0.37)
    fused, plain = [g.clone() for g in originals], [g.clone() for g in originals]
    triton_backend.phi_(fused, 1.2, coef=coef)
    triton_backend.phi_(plain, 1.2)
    for a, b in zip(fused, plain, strict=True):  # the interpreter rounds float32 -> bf16 toward zero: 1 ulp there
        want = (b.float() * coef).to(b.dtype)
        assert torch.equal(a, want) if a.dtype == torch.float32 else ulps(a, want.double()) <= 1
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=None, fused=None, amsgrad=False,
                 maximize=False, capturable=False, differentiable=False)  # fmt: skip
    runs = []
    for backend in (triton_backend, eager):
        params = [torch.randn(1500, generator=torch.Generator().manual_seed(5))]
        state = [[torch.zeros(1500)], [torch.zeros(1500)], [torch.tensor(0.0)]]
        backend.adamw_(params, [originals[0][:1500].clone()], *state, group, 1.2, coef=coef)
        buf = torch.full((40, 33), 1e-3)
        update = backend.muon_momentum_(originals[1].contiguous(), buf, 0.95, 1.2, True, coef=coef)
        runs.append([params[0], state[0][0], state[1][0], buf, update])
        assert state[2][0].item() == 1
    for a, b in zip(*runs, strict=True):
        assert_close_scaled(a, b, 4)
