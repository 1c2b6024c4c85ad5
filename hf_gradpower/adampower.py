"""AdamPower as one optimizer class: ``torch.optim.AdamW`` whose ``step`` applies phi_p itself.

Why a class when :func:`hf_gradpower.attach` works on any optimizer: AdamW is memory-bound, and phi as a
separate pass re-reads and re-writes every gradient (+35-40% of a fused AdamW step on CPU). Here, when a
param group qualifies (plain float hyper-parameters, no amsgrad, maximize, capturable or differentiable, and
tensors a fast kernel backend takes: CPU float32 for the C kernel, fp32/bf16/fp16 on an accelerator for
Triton), phi runs inside a one-pass kernel that also does the AdamW update, so its arithmetic hides under the
memory traffic AdamW pays anyway. Every other case (bf16 parameters on CPU, amsgrad, phi already applied
before clipping, p = 1, no compiler, a kernel that failed its self-check) applies phi with
:func:`hf_gradpower.power_` and runs torch's own AdamW update (fused or foreach, as configured) on the same
state. See :mod:`hf_gradpower.kernels`.

The optimizer *is* a ``torch.optim.AdamW``: same hyper-parameters, state layout and ``state_dict``; ``p``
is the ``gradpower_p`` group key that ``attach`` uses, so ``gradpower_p()``, ``detach``, ``apply_now`` and
checkpoints behave alike. One visible difference: after a one-pass step ``.grad`` still holds g, whereas
the hook path leaves phi(g) there.
"""

from __future__ import annotations

import torch

from hf_gradpower.adamw_step import adamw_group_step, is_plain_adamw
from hf_gradpower.attach import GROUP_KEY, attach, take_applied_flag, take_clip_coef
from hf_gradpower.kernels import dispatch, eager
from hf_gradpower.transform import DEFAULT_POWER, _local, power_

__all__ = ["AdamPower"]


class AdamPower(torch.optim.AdamW):
    """``torch.optim.AdamW`` on phi_p(g); ``p`` (default 1.2) is stored in every param group."""

    # The global step pre-hook of ``attach`` leaves optimizers with this flag alone.
    applies_gradpower_in_step = True

    def __init__(self, params, lr: float = 1e-3, *, p: float = DEFAULT_POWER, **adamw_kwargs) -> None:
        super().__init__(params, lr=lr, **adamw_kwargs)
        attach(self, p)  # p in every group and in defaults; loading a checkpoint without p keeps it
        # GradScaler must unscale for us: phi has to see unscaled gradients on every path.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on phi_p(g): a one-pass kernel where a group qualifies, else phi then torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        already_applied = take_applied_flag(self)
        coef = take_clip_coef(self)  # from clip_and_power_: phi(g) is multiplied by it
        for group in self.param_groups:
            p = group.get(GROUP_KEY, 1.0) if not already_applied else 1.0
            if (p == 1.0 and coef is None) or not one_pass_step(self, group, p, coef):
                if p != 1.0 or coef is not None:
                    power_((q.grad for q in group["params"]), p, coef=coef)
                adamw_group_step(self, group)
        return loss


def one_pass_step(optimizer: torch.optim.AdamW, group: dict, p: float, coef: torch.Tensor | None = None) -> bool:
    """AdamW on ``coef * phi_p(g)`` (p = 1: on ``coef * g``) for the whole group in one kernel call per (device,
    dtypes); False, before any state is created or step counted, where no fast backend serves the group. The
    backend passes its self-check first; DTensor (FSDP2) parameters, gradients and state are updated through their local shards."""
    with_grad = [q for q in group["params"] if q.grad is not None]
    if not with_grad or not is_plain_adamw(group):
        return False
    backend = dispatch.adamw_backend([_local(q) for q in with_grad], [_local(q.grad) for q in with_grad], p)
    if backend is eager:
        return False
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    tensors = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    return dispatch.adamw_(backend, *tensors, steps, group, p, coef=coef)
