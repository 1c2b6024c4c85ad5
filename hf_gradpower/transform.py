"""The GradPower transform phi_p(g) = sign(g) * |g|^p, applied in place to gradients.

This is the paper's phi in ``theta <- theta - lr * Q(phi(g))``: a stateless, elementwise map, so it
commutes with data-parallel sharding (it works on FSDP2 ``DTensor`` shards) and needs no optimizer
state. It is pure torch on purpose: optimizers, the Trainer and custom loops all call it.

Numerics. ``|g|^p`` underflows and loses digits in bf16/fp16 when ``p > 1`` (|g| ~ 1e-4 is common),
so low-precision gradients are transformed in fp32 and rounded back once. Loss-scaled gradients
``s * g`` must be unscaled first, because ``phi(s * g) = s^p * phi(g)``: ``grad_scale=s`` gives
``s * phi(g / s)``, i.e. the transform of the true gradient, still carrying the scale the fused
AdamW kernel (or the clipping code) will divide out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from hf_gradpower import accel
from hf_gradpower._kernels import phi_sumsq_cpu_many, phi_sumsq_eager, sign_power_, sign_power_cpu_many_

DEFAULT_POWER = 1.2

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def validate_power(p: float) -> float:
    """Return ``p`` as a float, or raise one clear ``ValueError`` if it is not a usable exponent."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"gradpower p must be a real number, got {p!r} ({type(p).__name__}); use e.g. p=1.2.")
    p = float(p)
    if not math.isfinite(p) or p <= 0:
        raise ValueError(
            f"gradpower p must be finite and > 0, got p={p}; the paper's default is 1.2 (p=1 disables GradPower)."
        )
    return p


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an in-place view of its data), or ``t`` itself."""
    if type(t).__name__ == "DTensor":
        if any(pl.is_partial() for pl in t.placements):
            raise ValueError(
                "gradpower cannot transform a DTensor gradient with a Partial placement (not yet reduced): "
                "phi(sum) != sum(phi). Apply GradPower after the gradient reduction (at optimizer.step)."
            )
        return t.to_local()
    return t


def _checked_local(g: torch.Tensor) -> torch.Tensor:
    """The tensor phi works on (a DTensor's local shard), after one clear error for unusable gradients."""
    if g.is_sparse:
        raise ValueError("gradpower does not support sparse gradients; use dense gradients (e.g. sparse=False).")
    if not g.is_floating_point():
        raise ValueError(f"gradpower needs floating-point gradients, got dtype {g.dtype}.")
    return _local(g)


def sign_power_tensor_(g: torch.Tensor, p: float) -> torch.Tensor:
    """In place ``g <- sign(g) * |g|^p`` for one dense floating tensor; returns ``g``."""
    local = _checked_local(g)
    if local.numel() == 0:
        return g
    if accel.takes_triton_path(local):  # accelerators: one fp32 pass in a Triton kernel
        accel.sign_power_tensors_([local], p)
        return g
    if local.dtype in _LOW_PRECISION:
        work = local.float()
        sign_power_(work, p)
        local.copy_(work)
    else:  # fp32: the fast kernel; fp64: the kernels' eager path, in its own precision
        sign_power_(local, p)
    return g


@torch.no_grad()
def power_(
    grads: Iterable[torch.Tensor | None], p: float, *, grad_scale: torch.Tensor | float | None = None,
    coef: torch.Tensor | None = None,
) -> None:
    """Apply phi_p in place to every tensor in ``grads`` (``None`` entries are skipped).

    ``grad_scale``: the loss scale the gradients still carry (GradScaler); the result is
    ``s * phi(g / s)`` so that dividing by ``s`` later yields ``phi`` of the true gradient.
    ``coef``: a clip coefficient (0-d tensor) multiplied into phi(g) in the same pass where the kernel allows
    (the CPU C kernel), else right after it.
    ``p == 1`` is the identity and returns without touching memory (bit-exact baseline), unless ``coef`` is given.
    """
    p = validate_power(p)
    grads = [g for g in grads if g is not None]
    if p == 1.0:
        if coef is not None and grads:
            torch._foreach_mul_([_checked_local(g) for g in grads], coef)
        return
    on_accelerator, others = [], []  # local tensors (DTensor shards unwrapped), split by where phi runs
    for g in grads:
        local = _checked_local(g)
        (on_accelerator if accel.takes_triton_path(local) else others).append(local)
    if on_accelerator:  # one multi-tensor launch, the loss scale folded into the kernel
        accel.sign_power_tensors_(on_accelerator, p, grad_scale=grad_scale)
        if coef is not None:
            torch._foreach_mul_(on_accelerator, coef)
    if grad_scale is None:  # CPU float32 gradients: one C kernel call for all of them, coef in the same pass
        others = sign_power_cpu_many_(others, p, coef=coef)
    for g in others:
        if grad_scale is not None:
            g.div_(grad_scale)
        sign_power_tensor_(g, p)
        if grad_scale is not None:
            g.mul_(grad_scale)
        if coef is not None:
            g.mul_(coef)


@torch.no_grad()
def power_sq_sum(grads: Iterable[torch.Tensor | None], p: float) -> torch.Tensor | None:
    """Sum of phi_p(g)**2 over every element of the local gradients (DTensor: this rank's shard), read only.

    float64, 0-d, on the first gradient's device (None without gradients): one kernel call for the CPU float32
    gradients, float64 torch ops for the rest.
    """
    p = validate_power(p)
    local = [_checked_local(g) for g in grads if g is not None]
    if not local:
        return None
    total, rest = phi_sumsq_cpu_many(local, p)
    device = local[0].device
    total = torch.zeros((), dtype=torch.float64, device=device) if total is None else total.to(device)
    for g in rest:
        total += phi_sumsq_eager(g, p).to(device)
    return total


def sign_power(g: torch.Tensor, p: float) -> torch.Tensor:
    """Out-of-place phi_p (for analysis and tests); same numerics as :func:`power_`."""
    p = validate_power(p)
    out = g.detach().clone()
    if p != 1.0:
        sign_power_tensor_(out, p)
    return out
