"""The first-use self-check of a fast backend on one (device, dtype combination), against float64.

Run by the dispatcher before a backend serves a combination for the first time (and so before an optimizer
creates state for it); :func:`check` raises on an exception or a mismatch. Probes, on the device itself:

* phi, for a 1-tuple ``(dtype,)``: special values (+-0, +-inf, nan), subnormals (not for bf16 storage),
  gradient-like values over many binades, a partial block, two tensors in one multi-tensor launch, an
  unaligned view, and a power-of-two loss scale; p = 0.8 and 1.2; against float64 phi, in ulps of the storage
  dtype (:data:`PHI_ULP_BOUND`); then what clipping uses: phi times a clip coefficient (one more rounding),
  the sums of squares of phi, read only (with and without a loss scale) and while writing phi, within
  :func:`sum_bound` (relative) of float64;
* for a 2-tuple ``(param dtype, grad dtype)``: one AdamW step on phi(g) at beta2 = 0.999 (two tensors, a
  partial block, an unaligned parameter) against ``torch.optim.AdamW`` on float64 copies fed float64 phi(g),
  also with a clip coefficient and with p = 1 and a coefficient (no phi), and one Muon momentum step
  (Nesterov), with and without a coefficient, against torch's formula in float64; error within
  :data:`STATE_BOUND` eps of the storage dtype times the largest reference value of each tensor.

The bounds are those the tests assert; the fp32 AdamW bound also rejects ``1 - beta2`` rounded in float32
(about 100 eps at beta2 = 0.999).
"""

from __future__ import annotations

import contextlib
import math
from types import ModuleType

import torch

PHI_ULP_BOUND = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}
STATE_BOUND = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}
PROBE_PS = (0.8, 1.2)
BETA2 = 0.999
COEF = 0.3125  # a probe clip coefficient: 5 * 2**-4, so that products with it round


def sum_bound(dtype: torch.dtype) -> float:
    """Relative error allowed in a sum of squares of phi: each phi within its ulp bound (the square doubles the
    relative error), plus float32 accumulation. A tensor left out or a wrong p is off by far more."""
    return 2 * PHI_ULP_BOUND[dtype] * torch.finfo(dtype).eps + 1e-5


def phi64(g: torch.Tensor, p: float) -> torch.Tensor:
    """float64 sign(g) |g|**p."""
    d = g.double()
    return d.abs().pow(p).copysign(d)


def ulps(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in units of the spacing of ``x.dtype`` at ``ref`` (float64 reference); equal values
    (infinities included) and NaN against NaN count 0."""
    rounded = ref.to(x.dtype).abs()
    spacing = (torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded).double()
    both_nan = x.isnan() & ref.isnan()
    err = torch.where(both_nan | (x.double() == ref), 0.0, (x.double() - ref).abs() / spacing)
    return err.max().item() if err.numel() else 0.0


def scaled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / (eps(x.dtype) * max|ref|)."""
    scale = torch.finfo(x.dtype).eps * ref.double().abs().max().item()
    return (x.double() - ref.double()).abs().max().item() / scale


def _gradients(n: int, seed: int, lo: float = -6.0, hi: float = 1.0) -> torch.Tensor:
    """Normal samples with magnitudes spread over 10**lo .. 10**hi (gradients span many binades)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(lo, hi, generator=gen)


def _unaligned(values: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a contiguous view that starts one element into its buffer (not 16-byte aligned)."""
    base = torch.empty(values.numel() + 1, dtype=dtype, device=device)
    view = base[1:]
    view.copy_(values)
    return view


def _scaled(g: torch.Tensor) -> torch.Tensor:
    """Loss-scaled gradients: magnitudes in [1e-2, 1e3], so that g / 1024 is normal even in fp16."""
    return g.abs().clamp(1e-2, 1e3).copysign(g)


def _phi_probe(dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-4, -7.0]
    if dtype != torch.bfloat16:  # bf16 subnormals: Triton's interpreter flushes them on load
        specials += [1e-40, -3e-39, 1.4e-45] if dtype == torch.float32 else [6e-8, -3e-6]
    return [
        _gradients(1500, 0).to(device, dtype),  # a whole block and a partial one
        torch.tensor(specials).to(device, dtype),  # a second tensor in the same launch
        _unaligned(_gradients(700, 1), device, dtype),
    ]


def check_phi(backend: ModuleType, device: torch.device, dtype: torch.dtype) -> None:
    bound = PHI_ULP_BOUND[dtype]
    for p in PROBE_PS:
        for scale in (None, 1024.0):
            probe = _phi_probe(dtype, device)
            if scale is not None:  # gradients a loss scale carries: g / s stays normal in every dtype
                probe = [
                    _scaled(_gradients(1500, 8)).to(device, dtype),
                    _unaligned(_scaled(_gradients(700, 9)), device, dtype),
                ]
            refs = [phi64(t, p) if scale is None else phi64(t.double() / scale, p) * scale for t in probe]
            backend.phi_(probe, p, grad_scale=scale)
            for i, (t, ref) in enumerate(zip(probe, refs, strict=True)):
                err = ulps(t, ref.to(t.device))
                if not err <= bound:
                    raise AssertionError(
                        f"phi (p={p}, {dtype}, probe tensor {i}, loss scale {scale}) is {err:.3g} ulp from "
                        f"float64 (bound {bound})"
                    )


def check_clipping_ops(backend: ModuleType, device: torch.device, dtype: torch.dtype) -> None:
    """phi with a clip coefficient, and the sums of squares of phi (read only, and while writing phi)."""
    p, bound = 1.2, PHI_ULP_BOUND[dtype]
    coef = torch.tensor(COEF, device=device)

    def finite_probe() -> list[torch.Tensor]:
        return [_gradients(1500, 10).to(device, dtype), _unaligned(_gradients(700, 11), device, dtype)]

    probe = finite_probe()
    refs = [phi64(t, p) * COEF for t in probe]
    backend.phi_(probe, p, coef=coef)
    for i, (t, ref) in enumerate(zip(probe, refs, strict=True)):
        err = ulps(t, ref.to(t.device))
        if not err <= bound + 1.0:
            raise AssertionError(f"phi times a clip coefficient ({dtype}, probe tensor {i}) is {err:.3g} ulp from "
                                 f"float64 (bound {bound + 1.0})")  # fmt: skip
    for scale in (None, 1024.0):
        probe = finite_probe() if scale is None else [_scaled(_gradients(1500, 12)).to(device, dtype)]
        want = [((phi64(t.double() / (scale or 1.0), p) * (scale or 1.0)) ** 2).sum().item() for t in probe]
        _assert_sums("read-only sums of squares of phi", backend.phi_sum_sq(probe, p, grad_scale=scale), want, dtype)
    probe = finite_probe()
    refs = [phi64(t, p) for t in probe]
    sums = backend.phi_sum_sq_(probe, p)
    for i, (t, ref) in enumerate(zip(probe, refs, strict=True)):
        err = ulps(t, ref.to(t.device))
        if not err <= bound:
            raise AssertionError(f"phi written by the sums of squares ({dtype}, probe tensor {i}) is {err:.3g} ulp "
                                 f"from float64 (bound {bound})")  # fmt: skip
    _assert_sums("sums of squares of phi, writing phi", sums, [(r**2).sum().item() for r in refs], dtype)


def _assert_sums(name: str, got: torch.Tensor, want: list[float], dtype: torch.dtype) -> None:
    got = got.double().cpu().tolist()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        rel = abs(g - w) / w
        if not rel <= sum_bound(dtype):
            raise AssertionError(f"{name} ({dtype}, probe tensor {i}) is {rel:.3g} (relative) from float64 "
                                 f"(bound {sum_bound(dtype):.3g})")  # fmt: skip


def _assert_close(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    err = scaled_error(x, ref.to(x.device))
    if not err <= STATE_BOUND[x.dtype]:
        raise AssertionError(
            f"{name} ({x.dtype}) is {err:.3g} eps*max|ref| from the float64 reference (bound {STATE_BOUND[x.dtype]})"
        )


def check_adamw(
    backend: ModuleType, device: torch.device, param_dtype: torch.dtype, grad_dtype: torch.dtype
) -> None:
    """AdamW on phi(g), on coef * phi(g) and, with p = 1, on coef * g (the step after clipping wrote phi)."""
    for p, coef in ((1.2, None), (1.2, COEF), (1.0, COEF)):
        _check_adamw_case(backend, device, param_dtype, grad_dtype, p, coef)


def _check_adamw_case(backend: ModuleType, device: torch.device, param_dtype: torch.dtype,
                      grad_dtype: torch.dtype, p: float, coef: float | None) -> None:
    group = dict(lr=1e-2, betas=(0.9, BETA2), eps=1e-8, weight_decay=0.1)
    case = f" (p={p}, clip coefficient {coef})"
    params = [torch.randn(1500, generator=torch.Generator().manual_seed(2)).to(device, param_dtype)]
    params.append(
        _unaligned(torch.randn(300, generator=torch.Generator().manual_seed(3)), device, param_dtype)
    )
    grads = [_gradients(q.numel(), 4 + i, -2.0, 0.5).to(device, grad_dtype) for i, q in enumerate(params)]
    exp_avgs = [torch.zeros_like(q) for q in params]
    exp_avg_sqs = [torch.zeros_like(q) for q in params]
    steps = [torch.tensor(0.0) for _ in params]
    ref_params = [torch.nn.Parameter(q.detach().cpu().double()) for q in params]
    for r, g in zip(ref_params, grads, strict=True):
        r.grad = phi64(g.cpu(), p) * (coef or 1.0)
    reference = torch.optim.AdamW(ref_params, foreach=False, **group)
    reference.step()
    full = {**reference.param_groups[0], "params": []}
    coef_t = None if coef is None else torch.tensor(coef, device=device)
    backend.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, full, p, coef=coef_t)
    for i, q in enumerate(params):
        state = reference.state[ref_params[i]]
        _assert_close(f"AdamW parameter {i}{case}", q, ref_params[i].detach())
        _assert_close(f"AdamW exp_avg {i}{case}", exp_avgs[i], state["exp_avg"])
        _assert_close(f"AdamW exp_avg_sq {i}{case}", exp_avg_sqs[i], state["exp_avg_sq"])
        if steps[i].item() != 1:
            raise AssertionError(f"AdamW step counter {i} is {steps[i].item()} after one step{case}")


def check_muon(
    backend: ModuleType, device: torch.device, buf_dtype: torch.dtype, grad_dtype: torch.dtype
) -> None:
    p, mu = 1.2, 0.95
    for coef in (None, COEF):
        grad = _gradients(40 * 48, 6, -3.0, 0.0).reshape(40, 48).to(device, grad_dtype)
        buf = (_gradients(40 * 48, 7, -3.0, 0.0) * 0.5).reshape(40, 48).to(device, buf_dtype)
        h, buf0 = phi64(grad.cpu(), p) * (coef or 1.0), buf.cpu().double()
        coef_t = None if coef is None else torch.tensor(coef, device=device)
        update = backend.muon_momentum_(grad, buf, mu, p, True, coef=coef_t)
        ref_buf = buf0.lerp(h, 1 - mu)
        _assert_close(f"Muon momentum buffer (clip coefficient {coef})", buf, ref_buf)
        _assert_close(f"Muon Nesterov update (clip coefficient {coef})", update, h.lerp(buf.cpu().double(), mu))


@contextlib.contextmanager
def _syncs_allowed(device: torch.device):
    """The probe reads results back (a host-device sync): allowed even under a sync debug mode."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@torch.no_grad()
def check(backend: ModuleType, device: torch.device, dtypes: tuple) -> None:
    """Raise if ``backend`` does not reproduce float64 / torch on ``dtypes`` (see the module docstring)."""
    backend.prepare()
    with _syncs_allowed(device):
        if len(dtypes) == 1:
            check_phi(backend, device, dtypes[0])
            check_clipping_ops(backend, device, dtypes[0])
        else:
            check_adamw(backend, device, *dtypes)
            check_muon(backend, device, *dtypes)
