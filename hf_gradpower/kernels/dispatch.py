"""Which backend serves which tensors: one choice per (backend, device type, dtype combination), remembered.

Backends: :mod:`.triton` (accelerators; CPU tensors under ``TRITON_INTERPRET=1``), :mod:`.cpu` (the C kernel
for CPU tensors, 0 < p <= 4), :mod:`.eager` (everything else, and the fallback). The first time a fast
backend is about to serve a (device type, dtype combination), it passes :mod:`.selfcheck` on probe tensors
on that device before any optimizer state is touched; an exception or a mismatch there gives one warning and
the eager backend for that combination for the rest of the process. A launch that raises later is treated
the same way (the step counters advance only after a launch returned, so the eager retry counts once).

Environment variable ``HF_GRADPOWER_KERNEL``:

* ``auto`` (default): fast backends where they apply and pass the self-check, eager elsewhere;
* ``eager``: the eager backend everywhere;
* ``fast``: like auto, but a failed self-check or launch raises instead of falling back;
* ``triton`` / ``c``: that backend wherever it applies, without the self-check (errors raise); elsewhere auto.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from types import ModuleType

import torch

from hf_gradpower.kernels import cpu, eager, selfcheck, triton

logger = logging.getLogger(__name__)

ENV_VAR = cpu.ENV_VAR
MODES = ("auto", "eager", "fast", triton.NAME, cpu.NAME)
_verdicts: dict[tuple, str | None] = {}  # (backend, device type, dtypes) -> None if good, else the reason
_lock = threading.Lock()


def kernel_mode() -> str:
    """``HF_GRADPOWER_KERNEL`` (see the module docstring); raises one clear error on anything else."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def reset() -> None:
    """Forget every self-check verdict (the next use of each combination checks again)."""
    with _lock:
        _verdicts.clear()


def candidate(t: torch.Tensor, p: float = 1.2) -> ModuleType:
    """The backend that would serve ``t`` under the current ``HF_GRADPOWER_KERNEL``, before its self-check."""
    return _candidate(t, p, kernel_mode())


def _candidate(t: torch.Tensor, p: float, mode: str) -> ModuleType:
    """The backend that would serve ``t`` (before its self-check)."""
    if mode == "eager":
        return eager
    if triton.takes(t):
        return triton
    if cpu.takes(t, p) and (mode in ("fast", cpu.NAME) or cpu.fast_kernel_available()):
        return cpu
    return eager


def _fail(backend: ModuleType, key: tuple, reason: str, mode: str) -> None:
    """Remember that ``backend`` may not serve ``key``; warn once (or raise in ``fast`` mode)."""
    message = (
        f"hf_gradpower: the {backend.NAME} kernels failed on {key[1]} for {', '.join(str(d)[6:] for d in key[2])} "
        f"({reason}); these tensors use eager torch ops for the rest of the process. Set {ENV_VAR}=eager to "
        f"choose that without the check, or {ENV_VAR}={backend.NAME} to use the kernels anyway."
    )
    if mode in ("fast", backend.NAME):
        raise RuntimeError(message)
    with _lock:
        first = _verdicts.get(key) is None
        _verdicts[key] = reason
    if first:
        logger.warning(message)


def _checked(backend: ModuleType, device: torch.device, dtypes: tuple, mode: str) -> ModuleType:
    """``backend`` once it passed its self-check on (device type, dtypes), else the eager backend."""
    if backend is eager or mode == backend.NAME:
        return backend
    key = (backend.NAME, device.type, dtypes)
    if key not in _verdicts:
        try:
            selfcheck.check(backend, device, dtypes)
        except Exception as exc:  # compile error, missing compiler or driver library, mismatch
            _fail(backend, key, f"{type(exc).__name__}: {exc}", mode)
        else:
            _verdicts[key] = None
    return backend if _verdicts[key] is None else eager


def backend_for(t: torch.Tensor, p: float = 1.2, dtypes: tuple | None = None) -> ModuleType:
    """The backend that serves ``t`` (self-checked on first use of its device type and ``dtypes``)."""
    mode = kernel_mode()
    return _checked(_candidate(t, p, mode), t.device, dtypes or (t.dtype,), mode)


def _run(backend: ModuleType, key_tensor: torch.Tensor, dtypes: tuple, op: str, *args, **kwargs):
    """``backend.op(...)``; a failure marks the combination bad and runs the eager backend's op instead."""
    if backend is eager:
        return getattr(eager, op)(*args, **kwargs)
    try:
        return getattr(backend, op)(*args, **kwargs)
    except Exception as exc:
        _fail(
            backend,
            (backend.NAME, key_tensor.device.type, dtypes),
            f"{type(exc).__name__}: {exc}",
            kernel_mode(),
        )
        return getattr(eager, op)(*args, **kwargs)


def _kind(t: torch.Tensor) -> tuple:
    """What a backend's choice depends on (class, layout, device, dtype): decided once per kind and call, not once
    per tensor (a step passes hundreds of tensors through here)."""
    return type(t), t.layout, t.device, t.dtype


def _grouped(tensors: Sequence[torch.Tensor], p: float) -> dict:
    """Tensors by (serving backend, device, dtype), in input order within each group."""
    mode = kernel_mode()
    chosen: dict = {}
    groups: dict = {}
    for t in tensors:
        kind = _kind(t)
        if kind not in chosen:
            chosen[kind] = _checked(_candidate(t, p, mode), t.device, (t.dtype,), mode)
        groups.setdefault((chosen[kind], t.device, t.dtype), []).append(t)
    return groups


def phi_(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None, coef=None
) -> None:
    """In place ``g <- coef * s * phi_p(g / s)`` (``s = grad_scale``, ``coef`` a 0-d float32 tensor, each 1 if
    None) for every tensor, each backend's share in one call. Plain tensors (a DTensor's local shard, not the
    DTensor) unless the eager backend serves them."""
    p = float(p)
    if p == 1.0:
        return
    for (backend, _, dtype), ts in _grouped(tensors, p).items():
        _run(backend, ts[0], (dtype,), "phi_", ts, p, grad_scale=grad_scale, coef=coef)


def phi_sum_sq(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None
) -> list[torch.Tensor]:
    """Sum of squares of phi_p of each tensor (``s * phi(g / s)`` with a loss scale), read only: one 0-d
    float32 tensor per input tensor, on its device, in input order."""
    out: dict[int, torch.Tensor] = {}
    for (backend, _, dtype), ts in _grouped(tensors, float(p)).items():
        sums = _run(backend, ts[0], (dtype,), "phi_sum_sq", ts, float(p), grad_scale=grad_scale)
        out.update(zip(map(id, ts), sums.unbind(0), strict=True))
    return [out[id(t)] for t in tensors]


def phi_sum_sq_(tensors: Sequence[torch.Tensor], p: float) -> list[torch.Tensor]:
    """In place ``g <- phi_p(g)`` and the sum of squares of each result (0-d float32 tensors, in input order), each
    backend's share in one call."""
    out: dict[int, torch.Tensor] = {}
    for (backend, _, dtype), ts in _grouped(tensors, float(p)).items():
        sums = _run(backend, ts[0], (dtype,), "phi_sum_sq_", ts, float(p))
        out.update(zip(map(id, ts), sums.unbind(0), strict=True))
    return [out[id(t)] for t in tensors]


def writes_phi_in_norm_pass(tensors: Sequence[torch.Tensor], p: float) -> bool:
    """Whether clipping should write phi while it sums the squares (every backend serving these tensors is bound by
    arithmetic, e.g. a CPU core) rather than read only and leave phi to the step (bytes bound, accelerators)."""
    return all(backend.WRITES_PHI_IN_NORM_PASS for backend, _, _ in _grouped(tensors, p))


def adamw_backend(params, grads, p: float) -> ModuleType:
    """The one backend that can run AdamW on phi_p(g) for all of a group's (param, grad) pairs (self-checked
    now, before the caller creates any state), or the eager backend."""
    if not params:
        return eager
    mode = kernel_mode()
    pairs = {(_kind(q), _kind(g)): (q, g) for q, g in zip(params, grads, strict=True)}
    chosen = {(_candidate(q, p, mode), _candidate(g, p, mode)) for q, g in pairs.values()}
    if len(chosen) != 1 or len({*chosen.pop()}) != 1:
        return eager
    backend = _candidate(params[0], p, mode)
    if backend is eager or not backend.adamw_takes(
        params, grads, params, params
    ):  # state is made like params
        return eager
    for q, g in pairs.values():
        if _checked(backend, q.device, (q.dtype, g.dtype), mode) is eager:
            return eager
    return backend


def check_adamw_state(params, exp_avgs, exp_avg_sqs) -> None:
    """One clear error where a moment's shape differs from its parameter's (a kernel would read out of bounds)."""
    for i, (q, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs, strict=True)):
        if m.shape != q.shape or v.shape != q.shape:
            raise ValueError(
                f"AdamW state of parameter {i} has exp_avg {tuple(m.shape)} and exp_avg_sq {tuple(v.shape)}, but the "
                f"parameter is {tuple(q.shape)}: the optimizer state belongs to another model or sharding. Load the "
                "optimizer checkpoint that matches this model, or start the optimizer without one."
            )


def adamw_(
    backend: ModuleType, params, grads, exp_avgs, exp_avg_sqs, steps, group: dict, p: float, *, coef=None
) -> bool:
    """One AdamW step on ``coef * phi_p(g)`` for a group's tensors (torch AdamW's state) by ``backend``
    (from :func:`adamw_backend`); ``steps`` advance once, also when the eager backend takes over. False, with
    nothing changed, where the backend cannot read the state's layout (e.g. a state loaded in another dtype)."""
    check_adamw_state(params, exp_avgs, exp_avg_sqs)
    if not backend.adamw_takes(params, grads, exp_avgs, exp_avg_sqs):
        return False
    dtypes = (params[0].dtype, grads[0].dtype)
    _run(
        backend, params[0], dtypes, "adamw_", params, grads, exp_avgs, exp_avg_sqs, steps, group, p, coef=coef
    )
    return True


def fuses_muon(grads: Sequence[torch.Tensor], bufs_dtype: torch.dtype | None = None) -> bool:
    """Whether a fused Muon momentum (phi inside the momentum kernel) serves all these gradients."""
    mode = kernel_mode()
    return bool(grads) and all(
        _candidate(g, 1.2, mode) is triton and g.is_contiguous()
        and _checked(triton, g.device, (bufs_dtype or g.dtype, g.dtype), mode) is triton
        for g in grads
    )  # fmt: skip


def muon_momentum_(grad, buf, momentum: float, p: float, nesterov: bool, *, coef=None) -> torch.Tensor:
    """Muon's momentum on ``coef * phi_p(grad)`` (``grad`` unchanged); returns the update."""
    dtypes = (buf.dtype, grad.dtype)
    backend = _checked(triton, grad.device, dtypes, kernel_mode()) if triton.muon_takes(grad, buf) else eager
    return _run(backend, buf, dtypes, "muon_momentum_", grad, buf, momentum, p, nesterov, coef=coef)


def backend_name(t: torch.Tensor, p: float = 1.2) -> str:
    """Which backend serves ``t`` now, for reports (the C kernel with its implementation name)."""
    backend = backend_for(t, p)
    return cpu.kernel_info()["impl"] if backend is cpu else backend.NAME
