"""Gradient clipping that knows phi: clip(phi(g)), the paper's order, with phi computed once per step.

``clip_and_power_(optimizer, max_norm)`` takes the place of "phi, then ``torch.nn.utils.clip_grad_norm_``,
then ``step``" (what :func:`hf_gradpower.apply_now` + ``clip_grad_norm_`` do) and gives the same update:

1. the total 2-norm of phi_p(g) over the optimizer's gradients from one pass (the squares summed in float64);
   FSDP2 ``DTensor`` shards are summed over the ranks that shard them, as ``clip_grad_norm_`` does, and DDP
   gradients are already reduced;
2. the clip coefficient ``min(1, max_norm / (norm + 1e-6))``, torch's formula in float32, as a 0-d tensor on
   the gradients' device (no host sync);
3. the next ``optimizer.step()`` multiplies phi(g) by it in its own pass over the gradients.

The kernel backends serving the gradients choose between two routes, one bound by arithmetic and one by bytes:

* write once (CPU: the C kernel, eager torch): the norm pass stores phi(g) into the gradients while it sums
  the squares, and the step applies only the coefficient (AdamPower: AdamW on coef * phi(g) in one pass;
  ``attach`` and MuonPower: one multiply, then the base step). ``.grad`` holds phi(g) after the call.
* read only (Triton): the norm pass only reads (phi in registers), and the step computes phi again with the
  coefficient (inside AdamPower's one-pass step and MuonPower's fused momentum, else one pass of coef * phi(g)
  before the base step). Per fp32 element that moves 32 bytes (norm 4, one-pass AdamW 28) against 36 for
  writing phi once, and 40 for Trainer's AdamW with clipping (norm 4, scaling 8, AdamW 28).

On a CPU core arithmetic decides (``python -m benchmarks.clipped_step``, 34M-parameter LLaMA, AMD EPYC with AVX2
only, 2-core KVM guest, against Trainer's AdamW with clipping, medians of five runs): write once 1.25x at 1
thread and 1.00x at 2 threads, read only 1.56x and 1.12x. With a loss scale still on the gradients (``grad_scale``) the norm pass reads
only, so that nothing is written before GradScaler's inf check.

Faults, as ``clip_grad_norm_`` + ``GradScaler``: a non-finite norm gives a nan coefficient (torch's formula),
so the step would write nan; GradScaler skips that step (its inf check finds the inf or nan, which phi keeps).
A skipped step leaves the coefficient unused; the next call replaces it. ``max_norm <= 0``: no clipping (the
norm is still returned from a read-only pass; phi runs in the step as usual).
Optimizers without GradPower (or p = 1 everywhere) are clipped by torch's own ``clip_grad_norm_``, bit for bit.
"""

from __future__ import annotations

import math

import torch

from hf_gradpower.attach import (
    GROUP_KEY,
    inner_optimizer,
    is_attached,
    mark_applied,
    set_clip_coef,
    take_applied_flag,
)
from hf_gradpower.kernels import dispatch
from hf_gradpower.transform import _local, power_sq_sum

__all__ = ["clip_and_power_"]


@torch.no_grad()
def clip_and_power_(
    optimizer: torch.optim.Optimizer, max_norm: float, *, grad_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Clip phi_p(g) to ``max_norm`` at the next ``optimizer.step()``; returns the total norm of phi_p(g).

    Use it where a loop would call ``clip_grad_norm_(model.parameters(), max_norm)``, after the backward pass
    (and the gradient reduction), before ``step``. ``grad_scale``: the loss scale the gradients still carry
    (fp16 ``GradScaler`` before ``unscale_``); the norm is then that of phi(g / s), and ``scaler.step``
    unscales before the step applies phi. The returned norm is a float32 0-d tensor (not synchronised).
    """
    opt = inner_optimizer(optimizer)
    max_norm = _checked_max_norm(max_norm)
    set_clip_coef(opt, None)  # a coefficient left by a step that GradScaler skipped must not reach this one
    if take_applied_flag(opt) == "apply_now":  # (a flag of ours from a skipped step concerned older gradients)
        raise ValueError(
            "apply_now already wrote phi into these gradients: clip them with torch.nn.utils.clip_grad_norm_, "
            "or call clip_and_power_ instead of apply_now (it applies phi at the step)."
        )
    powers = [group.get(GROUP_KEY, 1.0) if is_attached(opt) else 1.0 for group in opt.param_groups]
    if all(p == 1.0 for p in powers):
        return _clip_without_power(opt, max_norm, grad_scale)
    grads_of = [[q.grad for q in group["params"] if q.grad is not None] for group in opt.param_groups]
    write = grad_scale is None and max_norm > 0 and all(
        dispatch.writes_phi_in_norm_pass([_local(g) for g in grads], p) for grads, p in zip(grads_of, powers, strict=True)
    )  # fmt: skip
    sums: dict = {}  # gradient layout (None, or a DTensor's mesh and placements) -> float64 local sum
    for grads_in_group, p in zip(grads_of, powers, strict=True):
        by_layout: dict = {}
        for g in grads_in_group:
            by_layout.setdefault(_layout(g), []).append(g)
        for layout, grads in by_layout.items():
            part = power_sq_sum(grads, p, grad_scale=grad_scale, write=write)
            sums[layout] = part if layout not in sums else sums[layout] + part.to(sums[layout].device)
    if write:
        mark_applied(opt, "clip_and_power_")
    if not sums:
        return torch.zeros(())
    parts = [_reduced(layout, part) for layout, part in sums.items()]
    device = parts[0].device
    total_norm = torch.stack([t.to(device) for t in parts]).sum().sqrt().float()
    if max_norm > 0:
        set_clip_coef(opt, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return total_norm


def _checked_max_norm(max_norm) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or math.isnan(max_norm):
        raise ValueError(f"max_norm must be a number (<= 0: no clipping), got {max_norm!r}")
    return float(max_norm)


def _clip_without_power(opt: torch.optim.Optimizer, max_norm: float, grad_scale) -> torch.Tensor:
    """No phi anywhere: torch's clipping (with the loss scale taken out of the norm when one is given)."""
    params = [q for group in opt.param_groups for q in group["params"] if q.grad is not None]
    if grad_scale is None and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([q.grad for q in params])
    if grad_scale is not None:
        norm = norm / torch.as_tensor(grad_scale, dtype=norm.dtype, device=norm.device)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _layout(grad: torch.Tensor):
    if type(grad).__name__ == "DTensor":
        return grad.device_mesh, tuple(grad.placements)
    return None


def _reduced(layout, local_sum: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks holding a part of the gradients: summed over the mesh dimensions that shard them
    (what the Partial norm of ``clip_grad_norm_`` reduces), once over those that replicate them."""
    if layout is None:
        return local_sum
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh, placements = layout
    spec = [Partial("sum") if pl.is_shard() else Replicate() for pl in placements]
    return DTensor.from_local(local_sum, mesh, spec, run_check=False).full_tensor()
