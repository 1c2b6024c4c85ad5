"""First-use self-check and fallback of the fast kernel backends (Triton in its interpreter, the C kernel).

Faults are injected where a real machine fails: Triton's launch (``InterpretedFunction.run``: a missing C
compiler or driver library raises there) and the C kernel's ctypes calls. Each optimizer must then not
crash, warn once, count each step once and give exactly the eager backend's result.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs triton (pip install triton; Linux)")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import hf_gradpower as gp  # noqa: E402
from hf_gradpower.kernels import cpu, dispatch, selfcheck  # noqa: E402
from hf_gradpower.kernels import triton as triton_backend  # noqa: E402
from hf_gradpower.muon import MuonAdamW  # noqa: E402

COMBOS = [(d,) for d in triton_backend.DTYPES] + [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]  # fmt: skip


@pytest.fixture
def fresh_verdicts():
    dispatch.reset()
    yield
    dispatch.reset()


def test_self_check_passes_on_every_dtype_combination_in_the_interpreter(interpreter):
    for combo in COMBOS:
        selfcheck.check(triton_backend, torch.device("cpu"), combo)


def test_self_check_rejects_a_slightly_wrong_phi_and_a_wrong_adamw(interpreter, monkeypatch):
    """p off by 1e-4 (phi) and beta1 off by 1e-3 (AdamW): both caught."""
    real_phi, real_adamw = triton_backend.phi_, triton_backend.adamw_

    def phi_off(tensors, p, **kw):
        real_phi(tensors, p * 1.0001, **kw)

    def adamw_off(params, grads, exp_avgs, exp_avg_sqs, steps, group, p, **kw):
        real_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, {**group, "betas": (0.9009, 0.999)}, p, **kw)

    monkeypatch.setattr(triton_backend, "phi_", phi_off)
    with pytest.raises(AssertionError, match="ulp from float64"):
        selfcheck.check(triton_backend, torch.device("cpu"), (torch.float32,))
    monkeypatch.setattr(triton_backend, "adamw_", adamw_off)
    with pytest.raises(AssertionError, match="AdamW exp_avg"):
        selfcheck.check(triton_backend, torch.device("cpu"), (torch.bfloat16, torch.bfloat16))


@pytest.mark.parametrize("fault", ["sum-of-squares off by 1e-4", "norm pass writes nothing", "coefficient ignored"])
def test_self_check_rejects_wrong_clipping_ops(interpreter, monkeypatch, fault):
    """The ops clipping uses are probed too: a sum of squares 1e-4 off, a write-once norm pass that leaves the
    gradients as they were, an AdamW step that drops the clip coefficient: each caught before any use."""
    real_sum, real_adamw = triton_backend.phi_sum_sq, triton_backend.adamw_
    combo = (torch.float32,)
    if fault == "sum-of-squares off by 1e-4":
        monkeypatch.setattr(triton_backend, "phi_sum_sq", lambda ts, p, **kw: real_sum(ts, p, **kw) * 1.0001)
        match = "read-only sums of squares"
    elif fault == "norm pass writes nothing":
        monkeypatch.setattr(triton_backend, "phi_sum_sq_", lambda ts, p: real_sum(ts, p))
        match = "phi written by the sums of squares"
    else:
        monkeypatch.setattr(triton_backend, "adamw_", lambda *a, coef=None: real_adamw(*a))
        combo, match = (torch.float32, torch.float32), "clip coefficient 0.3125"
    with pytest.raises(AssertionError, match=match):
        selfcheck.check(triton_backend, torch.device("cpu"), combo)


# ----------------------------------------------------------------------------------------------------------
# fault injection: three optimizers, each against the same run on the eager backend
# ----------------------------------------------------------------------------------------------------------
def _adampower(params):
    return gp.AdamPower(params, lr=1e-2, p=1.2, weight_decay=0.1, betas=(0.9, 0.999))


def _attached_adamw(params):
    return gp.attach(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999)), 1.2)


def _muonpower(params):
    groups = [{"params": [q for q in params if q.ndim == 2], "use_muon": True},
              {"params": [q for q in params if q.ndim != 2]}]  # fmt: skip
    return gp.attach(MuonAdamW(groups, lr=1e-2, weight_decay=0.1), 1.2)


OPTIMIZERS = {"adampower": _adampower, "attach(adamw)": _attached_adamw, "muonpower": _muonpower}


def _train(build, steps: int = 3) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((24, 40), (1100,), (7,))]
    opt = build(params)
    for _ in range(steps):
        for q in params:
            q.grad = torch.randn(q.shape, generator=gen) * 1e-2
        opt.step()
    return [q.detach().clone() for q in params], opt


def _eager_result(monkeypatch, build):
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    params, _ = _train(build)
    monkeypatch.delenv(dispatch.ENV_VAR)
    return params


def _assert_fell_back(caplog, build, reference, backend_name: str):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        params, opt = _train(build)
    warnings = [r for r in caplog.records if r.name == dispatch.__name__]
    assert len(warnings) >= 1 and all(f"the {backend_name} kernels failed" in r.message for r in warnings)
    assert len({r.message for r in warnings}) == len(warnings)  # each (device, dtypes) warned once
    assert f"{dispatch.ENV_VAR}=eager" in warnings[0].message
    for q in opt.param_groups[0]["params"]:
        if "step" in opt.state[q]:
            assert opt.state[q]["step"].item() == 3  # each step counted once
    for a, b in zip(params, reference, strict=True):
        assert torch.equal(a, b)
    return warnings


def _raise_at_launch(self, *args, **kwargs):
    raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")


def _wrong_launch(real):
    def launch(self, *args, grid, warmup, **kwargs):  # every float argument (p, betas, lr...) off by 0.1%
        off = [a * 1.001 if type(a) is float else a for a in args]
        return real(self, *off, grid=grid, warmup=warmup, **kwargs)

    return launch


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("fault", ["raises", "wrong numbers"])
def test_triton_fault_falls_back_to_eager(interpreter, monkeypatch, caplog, name, fault):
    build = OPTIMIZERS[name]
    reference = _eager_result(monkeypatch, build)
    real = InterpretedFunction.run
    monkeypatch.setattr(
        InterpretedFunction, "run", _raise_at_launch if fault == "raises" else _wrong_launch(real)
    )
    warnings = _assert_fell_back(caplog, build, reference, "triton")
    if fault == "raises":
        assert "Failed to find C compiler" in warnings[0].message


def test_a_launch_failing_after_a_passed_self_check_counts_the_step_once(interpreter, monkeypatch, caplog):
    """The self-check passed, then the real launch raises: the eager backend redoes the step, counted once."""
    reference = _eager_result(monkeypatch, _adampower)
    for combo in [(torch.float32,), (torch.float32, torch.float32)]:
        dispatch.backend_for(torch.ones(1), 1.2, combo)  # verdicts: good
    monkeypatch.setattr(InterpretedFunction, "run", _raise_at_launch)
    _assert_fell_back(caplog, _adampower, reference, "triton")


@pytest.fixture
def fresh_c_kernel(fresh_verdicts):
    if not cpu.fast_kernel_available():
        pytest.skip("C kernel unavailable: " + cpu.kernel_info()["reason"])
    saved = dict(cpu._state)
    yield
    cpu._state.clear()
    cpu._state.update(saved)


@pytest.mark.parametrize("fault", ["raises", "wrong numbers"])
def test_c_kernel_adamw_fault_falls_back_to_eager(fresh_c_kernel, monkeypatch, caplog, fault):
    """AdamPower with the C kernel's AdamW entry raising, or taking a wrong step size: its result is then that
    of phi (the C kernel's, intact) followed by torch's AdamW, i.e. attach(AdamW)'s."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reference, _ = _train(_attached_adamw)
    real = cpu.CpuKernel.adamw_power_many

    def broken(self, params, grads, exp_avgs, exp_avg_sqs, p, hyper, nthreads):
        if fault == "raises":
            raise OSError("libgomp.so.1: cannot open shared object file")
        hyper[5] *= 1.01  # the first tensor's lr / bias_correction1
        real(self, params, grads, exp_avgs, exp_avg_sqs, p, hyper, nthreads)

    monkeypatch.setattr(cpu.CpuKernel, "adamw_power_many", broken)
    _assert_fell_back(caplog, _adampower, reference, "c")


@pytest.mark.parametrize("name", ["attach(adamw)", "muonpower"])
@pytest.mark.parametrize("fault", ["raises", "wrong numbers"])
def test_c_kernel_phi_fault_falls_back_to_eager(fresh_c_kernel, monkeypatch, caplog, name, fault):
    """attach(AdamW) and MuonPower (phi by the hook) with the C kernel's phi entry raising or using a p off by
    1e-4, after the kernel was built and validated."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reference = _eager_result(monkeypatch, OPTIMIZERS[name])
    real = cpu.CpuKernel.sign_power_many

    def broken(self, xs, p, nthreads):
        if fault == "raises":
            raise OSError("libgomp.so.1: cannot open shared object file")
        real(self, xs, p * 1.0001, nthreads)

    monkeypatch.setattr(cpu.CpuKernel, "sign_power_many", broken)
    _assert_fell_back(caplog, OPTIMIZERS[name], reference, "c")


def test_fast_mode_raises_instead_of_falling_back(interpreter, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    monkeypatch.setattr(InterpretedFunction, "run", _raise_at_launch)
    with pytest.raises(RuntimeError, match="Failed to find C compiler"):
        gp.power_([torch.randn(10)], 1.2)


def test_adamw_state_of_another_shape_is_one_clear_error(fresh_c_kernel):
    """A moment loaded for another model: one ValueError naming the shapes, before any kernel reads it."""
    params = [torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(8, 8))]
    opt = _adampower(params)
    for q in params:
        q.grad = torch.randn(q.shape) * 1e-2
    opt.step()
    opt.state[params[1]]["exp_avg_sq"] = torch.zeros(8)
    before = params[1].detach().clone()
    with pytest.raises(ValueError, match=r"exp_avg_sq \(8,\), but the parameter is \(8, 8\)"):
        opt.step()
    assert torch.equal(params[1].detach(), before) and opt.state[params[1]]["step"].item() == 1


def test_block_maps_are_cached_by_sizes_and_bounded_in_bytes():
    maps = triton_backend._BlockMaps(max_bytes=7_850)
    cpu_device = torch.device("cpu")
    first = maps.get((3000, 5), cpu_device)
    numel, first_block, block_tensor = first
    assert (
        numel.tolist() == [3000, 5]
        and first_block.tolist() == [0, 3]
        and block_tensor.tolist() == [0, 0, 0, 1]
    )
    assert maps.get((3000, 5), cpu_device) is first  # a hit: nothing rebuilt
    maps.get((2_000_000,), cpu_device)  # 1954 blocks: 7832 bytes; with the first map (48) over the bound
    assert (cpu_device, (3000, 5)) not in maps.maps and maps.bytes == 7832
