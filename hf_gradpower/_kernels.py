"""phi_p(x) = sign(x) * |x|**p in place: which implementation runs, and the accurate torch fallback.

* :func:`sign_power_eager_` -- plain torch ops, the power in float64 rounded once (any device, dtype,
  DTensor). It is the fallback and the reference the fast path is validated against.
* the C kernel (:mod:`hf_gradpower._cpu_kernel`, ``gradpower_kernel.c``) for CPU float32 tensors, built at
  first use -- only when a CPU float32 tensor actually needs it -- and used after it passed validation.
  It also has ``gp_adamw_power_many``, the one-pass AdamW step on phi_p(g) used by
  :class:`hf_gradpower.adampower.AdamPower`.

Accuracy of the C kernel against float64, for 0 < p <= 4 (larger ``p`` uses the eager path): measured
maximum 1.22 ulp for AVX-512, 2.54 for AVX2 and the portable C loop (``_cpu_kernel.ULP_BOUNDS``: 1.3 / 2.6 /
2.6), specials exact; ``tests/test_kernels.py`` asserts these over a dense sweep of p and x for each variant
it can build.

Environment variable ``HF_GRADPOWER_KERNEL``: ``auto`` (default), ``eager`` (always the torch ops) or
``fast`` (use the C kernel for CPU float32 tensors and raise if it cannot be built / failed validation;
other devices and dtypes always use the eager path).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from hf_gradpower import _cpu_kernel
from hf_gradpower._cpu_kernel import FAST_P_MAX, ULP_BOUND, CpuKernel, max_ulp_error

logger = logging.getLogger(__name__)

__all__ = [
    "FAST_P_MAX", "ULP_BOUND", "dense_cpu_f32", "fast_kernel_available", "kernel_info", "max_ulp_error",
    "sign_power_", "sign_power_cpu_many_", "sign_power_eager_", "sign_power_fast_",
]

ENV_VAR = "HF_GRADPOWER_KERNEL"

_EAGER_CHUNK = 1 << 22


def _eager_block_(x: torch.Tensor, p: float) -> None:
    if x.device.type == "mps":  # no float64 there: x * |x|**(p-1) in float32 (small exponent, few ulp)
        a = x.abs().pow_(p - 1.0)
        if p < 1.0:
            a.masked_fill_((x == 0) | x.isinf(), 1.0)
        x.mul_(a)
        return
    a = x.to(torch.float64)
    x.copy_(a.abs().pow_(p).copysign_(a))


def sign_power_eager_(x: torch.Tensor, p: float) -> None:
    """In place ``x <- sign(x) * |x|**p`` with plain torch ops (any device, dtype, layout, DTensor).

    The power is evaluated in float64 and rounded once (<= 0.5 ulp): torch's float32 ``pow`` with a scalar
    non-integer exponent is off by up to ~30 ulp on CPU for p = 1.2. Contiguous tensors are processed in
    chunks of 4M elements to bound the float64 temporary (32 MB).
    """
    n = x.numel()
    if n == 0:
        return
    p = float(p)
    with torch.no_grad():
        if n > _EAGER_CHUNK and x.is_contiguous() and not _is_dtensor(x):
            flat = x.view(-1)
            for start in range(0, n, _EAGER_CHUNK):
                _eager_block_(flat[start : start + _EAGER_CHUNK], p)
        else:
            _eager_block_(x, p)


def _is_dtensor(x: torch.Tensor) -> bool:
    return hasattr(x, "_local_tensor") and hasattr(x, "placements")


# ----------------------------------------------------------------------------------------------------------
# the C kernel: first use, state, selection
# ----------------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": False, "kernel": None, "reason": "not initialised"}


def load_variant(variant: str = "native") -> CpuKernel:
    """Build and validate one kernel variant (see :mod:`hf_gradpower._cpu_kernel`); RuntimeError if it fails."""
    k = _cpu_kernel.build(variant)
    ok, msg = _cpu_kernel.validate(k, sign_power_eager_)
    if not ok:
        raise RuntimeError(f"kernel {k.impl} failed validation: {msg}")
    return k


def _init_fast() -> None:
    with _lock:
        if _state["initialised"]:
            return
        t0 = time.perf_counter()
        try:
            k = _cpu_kernel.build()
        except Exception as exc:
            _state.update(kernel=None, reason=f"build failed: {exc}")
            logger.info("hf_gradpower: fast CPU kernel unavailable (%s); using eager torch ops", exc)
        else:
            try:
                ok, msg = _cpu_kernel.validate(k, sign_power_eager_)
            except Exception as exc:  # pragma: no cover - defensive
                ok, msg = False, f"validation raised {exc!r}"
            if ok:
                _state.update(kernel=k, reason=msg)
            else:
                _state.update(kernel=None, reason=f"validation failed: {msg}")
                logger.warning(
                    "hf_gradpower: fast CPU kernel (%s) failed validation (%s); falling back to eager torch ops",
                    k.impl,
                    msg,
                )
        _state["init_seconds"] = time.perf_counter() - t0
        _state["initialised"] = True


def fast_kernel_available() -> bool:
    """Build/validate the fast CPU kernel if not done yet and report whether it is usable."""
    if not _state["initialised"]:
        _init_fast()
    return _state["kernel"] is not None


def fast_kernel() -> CpuKernel:
    """The validated C kernel; raises RuntimeError if it is unavailable (see :func:`fast_kernel_available`)."""
    if not fast_kernel_available():
        raise RuntimeError(f"hf_gradpower fast kernel unavailable: {_state['reason']}")
    return _state["kernel"]


@contextlib.contextmanager
def using_kernel(kernel: CpuKernel | None) -> Iterator[None]:
    """Temporarily run CPU float32 tensors through ``kernel`` (None: the eager torch path); for benchmarks."""
    with _lock:
        saved = dict(_state)
        _state.update(initialised=True, kernel=kernel, reason="selected by using_kernel")
    try:
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)


def kernel_mode() -> str:
    """``HF_GRADPOWER_KERNEL``: ``auto`` (default), ``eager`` or ``fast``; raises on anything else."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "eager", "fast"):
        raise ValueError(f"{ENV_VAR} must be auto, eager or fast, got {mode!r}")
    return mode


def kernel_info() -> dict[str, Any]:
    """Diagnostics: implementation name, compiler flags, first-use seconds, validation message."""
    k = _state["kernel"]
    return {
        "initialised": _state["initialised"],
        "available": k is not None,
        "impl": k.impl if k else None,
        "flags": k.flags if k else None,
        "from_cache": k.cached if k else None,
        "init_seconds": _state.get("init_seconds"),
        "reason": _state["reason"],
        "mode": os.environ.get(ENV_VAR, "auto"),
    }


# ----------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------
def dense_cpu_f32(t: torch.Tensor) -> bool:
    """A plain (not DTensor or other subclass) dense contiguous CPU float32 tensor: what the C kernel reads."""
    plain = type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
    return plain and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _wants_kernel(p: float) -> bool:
    return kernel_mode() != "eager" and 0.0 < p <= FAST_P_MAX and math.isfinite(p)


def _kernel_or_none() -> CpuKernel | None:
    """The kernel (built now if needed) in auto/fast mode; None where auto falls back; raises in fast mode."""
    if kernel_mode() == "fast":
        return fast_kernel()
    return _state["kernel"] if fast_kernel_available() else None


def _dense_permuted(x: torch.Tensor) -> torch.Tensor | None:
    """A contiguous view of the same memory as ``x`` with permuted dims (e.g. for ``x.t()``), or None."""
    if x.dim() < 2:
        return None
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    y = x.permute(order)
    return y if y.is_contiguous() else None


def sign_power_fast_(x: torch.Tensor, p: float) -> None:
    """The C kernel on a CPU float32 tensor (no dispatch). Raises RuntimeError if it is unavailable."""
    kernel = fast_kernel()
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError("sign_power_fast_ needs a CPU float32 tensor")
    if not (0.0 < p <= FAST_P_MAX) or not math.isfinite(p):
        raise ValueError(f"sign_power_fast_ supports 0 < p <= {FAST_P_MAX}, got {p}")
    if x.numel() == 0:
        return
    target = x if x.is_contiguous() else _dense_permuted(x)
    if target is None:
        tmp = x.contiguous()
        kernel.sign_power_many([tmp], p, torch.get_num_threads())
        with torch.no_grad():
            x.copy_(tmp)
        return
    kernel.sign_power_many([target], p, torch.get_num_threads())


def sign_power_cpu_many_(xs: Sequence[torch.Tensor], p: float, coef: torch.Tensor | None = None) -> list[torch.Tensor]:
    """phi_p (times ``coef``, a CPU 0-d tensor, if given) in place on every dense contiguous CPU float32 tensor of
    ``xs`` in ONE kernel call (one OpenMP region); returns the tensors it left for the caller's per-tensor path
    (other devices, dtypes, layouts, or all of them where the kernel is off). Nothing is built when no tensor
    is a CPU float32 one."""
    p = float(p)
    if not _wants_kernel(p) or (coef is not None and coef.device.type != "cpu"):
        return list(xs)
    mine = [x for x in xs if dense_cpu_f32(x)]
    if not mine or len({x.data_ptr() for x in mine}) < len(mine):  # a tensor twice would race with itself
        return list(xs)
    kernel = _kernel_or_none()
    if kernel is None:
        return list(xs)
    kernel.sign_power_many(mine, p, torch.get_num_threads(), coef=1.0 if coef is None else float(coef))
    return [x for x in xs if not dense_cpu_f32(x)]


def phi_sumsq_eager(x: torch.Tensor, p: float) -> torch.Tensor:
    """Sum of ``phi_p(x)**2 = |x|**(2p)`` over ``x`` in float64 (0-d, on x's device); 4M-element chunks bound the
    float64 temporary as in :func:`sign_power_eager_`."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, flat.numel(), _EAGER_CHUNK):
        block = flat[start : start + _EAGER_CHUNK].to(torch.float64).abs_()
        total += (block.square_() if p == 1.0 else block.pow_(2.0 * p)).sum()
    return total


def phi_sumsq_cpu_many(xs: Sequence[torch.Tensor], p: float) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Sum of ``phi_p(x)**2`` over the dense contiguous CPU float32 tensors of ``xs`` in ONE read-only kernel call
    (float64, 0-d; None where none qualifies or the kernel is off), and the tensors left for the caller.
    p = 1 is left to the caller (the squares of g are exact in float64 there; the AVX-512 phi is not the identity)."""
    p = float(p)
    if p == 1.0 or not _wants_kernel(p):
        return None, list(xs)
    mine = [x for x in xs if dense_cpu_f32(x)]
    kernel = _kernel_or_none() if mine else None
    if kernel is None:
        return None, list(xs)
    return kernel.phi_sumsq_many(mine, p, torch.get_num_threads()).sum(), [x for x in xs if not dense_cpu_f32(x)]


def sign_power_(x: torch.Tensor, p: float) -> None:
    """In place: ``x <- sign(x) * |x|**p`` (phi(+-0) = +-0, phi(+-inf) = +-inf, phi(nan) = nan).

    ``x`` is normally float32 (any device, any strides); other floating dtypes use the eager path. ``p`` is a
    finite float > 0. CPU float32 tensors use the validated C kernel when available (see module docstring
    for ``HF_GRADPOWER_KERNEL``); everything else uses :func:`sign_power_eager_`.
    """
    p = float(p)
    if p == 1.0:
        return
    if _is_dtensor(x):
        placements = getattr(x, "placements", ())
        if any(type(pl).__name__ == "Partial" for pl in placements):
            # pending reduction: a nonlinear map must see the reduced values -> let DTensor handle it
            sign_power_eager_(x, p)
            return
        x = x._local_tensor  # elementwise op: shards / replicas can be transformed locally
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _wants_kernel(p):
        sign_power_eager_(x, p)
        return
    if x.numel() == 0:
        return
    if _kernel_or_none() is not None:
        sign_power_fast_(x, p)
    else:
        sign_power_eager_(x, p)
