"""The GradPower transform phi_p(g) = sign(g) * |g|^p, applied in place to gradients.

This is the paper's phi in ``theta <- theta - lr * Q(phi(g))``: a stateless, elementwise map, so it
commutes with data-parallel sharding (it works on FSDP2 ``DTensor`` shards) and needs no optimizer
state. Optimizers, the Trainer and custom loops all call it; the kernels that compute it (eager torch, the
C kernel, Triton) are chosen per device and dtype by :mod:`hf_gradpower.kernels`.

Numerics. ``|g|^p`` underflows and loses digits in bf16/fp16 when ``p > 1`` (|g| ~ 1e-4 is common),
so low-precision gradients are transformed in fp32 (or float64) and rounded back once. Loss-scaled gradients
``s * g`` must be unscaled first, because ``phi(s * g) = s^p * phi(g)``: ``grad_scale=s`` gives
``s * phi(g / s)``, i.e. the transform of the true gradient, still carrying the scale the fused
AdamW kernel (or the clipping code) will divide out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from hf_gradpower.kernels import dispatch

DEFAULT_POWER = 1.2



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
    dispatch.phi_([_checked_local(g)], p)
    return g


@torch.no_grad()
def power_(
    grads: Iterable[torch.Tensor | None], p: float, *, grad_scale: torch.Tensor | float | None = None,
    coef: torch.Tensor | None = None,
) -> None:
    """Apply phi_p in place to every tensor in ``grads`` (``None`` entries are skipped).

    ``grad_scale``: the loss scale the gradients still carry (GradScaler); the result is
    ``s * phi(g / s)`` so that dividing by ``s`` later yields ``phi`` of the true gradient.
    ``coef``: a clip coefficient (0-d float32 tensor) multiplied into the result in the same pass
    (:func:`hf_gradpower.clip_and_power_` leaves it for the step).
    ``p == 1`` is the identity and returns without touching memory (bit-exact baseline), unless ``coef`` is given.
    Each kernel backend gets its share of the tensors in one call (see :mod:`hf_gradpower.kernels`).
    """
    p = validate_power(p)
    local = [_checked_local(g) for g in grads if g is not None]
    if p == 1.0:
        if coef is not None and local:
            torch._foreach_mul_(local, coef)
        return
    dispatch.phi_(local, p, grad_scale=grad_scale, coef=coef)


@torch.no_grad()
def power_sq_sum(
    grads: Iterable[torch.Tensor | None], p: float, *, grad_scale: torch.Tensor | float | None = None,
    write: bool = False,
) -> torch.Tensor | None:
    """Sum of phi_p(g)**2 over every element of the local gradients (a DTensor's shard on this rank); with
    ``grad_scale`` s that of the true gradients g / s. float64, 0-d, on the first gradient's device (None
    without gradients). Each kernel backend reads its share in one call: read only, or with ``write`` (no
    ``grad_scale``) storing phi_p(g) into the gradients in the same pass."""
    p = validate_power(p)
    if write and grad_scale is not None:
        raise ValueError("power_sq_sum(write=True) takes unscaled gradients: unscale them first, or write=False")
    local = [_checked_local(g) for g in grads if g is not None]
    if not local:
        return None
    device = local[0].device
    if write and p != 1.0:
        parts = dispatch.phi_sum_sq_(local, p)
    else:
        parts = dispatch.phi_sum_sq(local, p, grad_scale=grad_scale)
    total = torch.stack([s.to(device, torch.float64) for s in parts]).sum()
    if grad_scale is not None:  # the backends sum (s phi(g / s))^2
        total = total / torch.as_tensor(grad_scale, dtype=torch.float64, device=device).square()
    return total


def sign_power(g: torch.Tensor, p: float) -> torch.Tensor:
    """Out-of-place phi_p (for analysis and tests); same numerics as :func:`power_`."""
    p = validate_power(p)
    out = g.detach().clone()
    if p != 1.0:
        sign_power_tensor_(out, p)
    return out
