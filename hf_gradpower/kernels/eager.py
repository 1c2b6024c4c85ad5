"""The eager backend: plain torch ops on any device, dtype, layout and DTensor. It is the reference the other
backends are checked against and the fallback wherever they cannot run or fail their self-check.

phi is evaluated in float64 and rounded once (<= 0.5 ulp of the storage dtype; on MPS, which has no float64,
``x * |x|**(p-1)`` in float32); AdamW is torch's own functional update on phi(g).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.optim.adam import adam

NAME = "eager"
# Clipping writes phi in its norm pass rather than computing it again at the step (see hf_gradpower.clipping).
WRITES_PHI_IN_NORM_PASS = True
_CHUNK = 1 << 22  # float64 temporaries of at most 32 MB


def _is_dtensor(x: torch.Tensor) -> bool:
    return hasattr(x, "_local_tensor") and hasattr(x, "placements")


def _blocks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` itself, or 4M-element views of it when it is large, contiguous and plain."""
    n = x.numel()
    if n > _CHUNK and x.is_contiguous() and not _is_dtensor(x):
        flat = x.view(-1)
        for start in range(0, n, _CHUNK):
            yield flat[start : start + _CHUNK]
    else:
        yield x


def _phi_wide(x: torch.Tensor, p: float) -> torch.Tensor:
    """phi_p(x) in float64 (float32 on MPS, ``x * |x|**(p-1)``, exact for zeros and infinities)."""
    if p == 1.0:
        return x.to(torch.float64 if x.device.type != "mps" else torch.float32)
    if x.device.type == "mps":
        a = x.abs().pow_(p - 1.0)
        if p < 1.0:
            a.masked_fill_((x == 0) | x.isinf(), 1.0)
        return a.mul_(x)
    a = x.to(torch.float64)
    return a.abs().pow_(p).copysign_(a)


@torch.no_grad()
def sign_power_(x: torch.Tensor, p: float) -> None:
    """In place ``x <- sign(x) * |x|**p`` (phi(+-0) = +-0, phi(+-inf) = +-inf, phi(nan) = nan).

    torch's float32 ``pow`` with a scalar non-integer exponent is off by up to ~30 ulp on CPU for p = 1.2, so
    the power is taken in float64 and rounded once.
    """
    p = float(p)
    for block in _blocks(x):
        block.copy_(_phi_wide(block, p))


@torch.no_grad()
def phi_(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None, coef=None
) -> None:
    """In place ``g <- coef * s * phi_p(g / s)`` for each tensor (``s = grad_scale``, or 1; ``coef``: a clip
    coefficient, a 0-d tensor, or None), phi rounded to the storage dtype before the product as clipping a
    stored phi would."""
    for t in tensors:
        if grad_scale is None:
            sign_power_(t, p)
        else:
            t.div_(grad_scale)
            sign_power_(t, p)
            t.mul_(grad_scale)
        if coef is not None:
            t.mul_(coef)


@torch.no_grad()
def phi_sum_sq(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-tensor sums of squares of what :func:`phi_` would write (the tensors are only read), float32, on
    the tensors' device (one entry per tensor)."""
    sums = []
    for t in tensors:
        total = torch.zeros((), dtype=torch.float64, device=t.device)
        for block in _blocks(t):
            wide = block if grad_scale is None else block / grad_scale
            h = _phi_wide(wide, float(p))
            if grad_scale is not None:
                h = h * grad_scale
            total += h.double().square().sum()
        sums.append(total.float())
    return torch.stack(sums) if sums else torch.zeros(0)


@torch.no_grad()
def phi_sum_sq_(tensors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """In place ``g <- phi_p(g)`` and the per-tensor sums of squares of the result (float32, one per tensor)."""
    phi_(tensors, p)
    return phi_sum_sq(tensors, 1.0)


def torch_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group: dict, has_complex=False
) -> None:
    """torch's functional AdamW for one param group's tensors (its fused/foreach kernels as the group asks);
    increments ``steps``."""
    beta1, beta2 = group["betas"]
    adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
        fused=group["fused"], grad_scale=None, found_inf=None,
        decoupled_weight_decay=group.get("decoupled_weight_decay", True),
    )  # fmt: skip


@torch.no_grad()
def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict, p: float, *, coef=None) -> None:
    """One AdamW step on ``coef * phi_p(g)`` (torch AdamW's formulas and state); increments ``steps``.

    ``.grad`` is left holding ``coef * phi_p(g)`` (the transform runs in place before torch's update)."""
    if p != 1.0:
        phi_(grads, p, coef=coef)
    elif coef is not None:
        torch._foreach_mul_(grads, coef)
    torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, group)


def momentum_from_(h: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """torch Muon's momentum on an already transformed gradient ``h``: ``buf.lerp_(h, 1 - mu)``; returns the
    update (``h.lerp(buf, mu)`` for Nesterov, else ``buf``)."""
    buf.lerp_(h, 1 - momentum)
    return h.lerp(buf, momentum) if nesterov else buf


@torch.no_grad()
def muon_momentum_(grad, buf, momentum: float, p: float, nesterov: bool, *, coef=None) -> torch.Tensor:
    """Muon's momentum on ``coef * phi_p(grad)``; ``grad`` is left as it is; returns the update."""
    h = grad.clone()
    if p != 1.0:
        sign_power_(h, p)
    if coef is not None:
        h.mul_(coef)
    return momentum_from_(h, buf, momentum, nesterov)
