"""AdamPower as one optimizer class: ``torch.optim.AdamW`` whose ``step`` applies phi_p itself.

Why a class when :func:`hf_gradpower.attach` works on any optimizer: AdamW is memory-bound, and phi as a
separate pass re-reads and re-writes every gradient (+35-40% of a fused AdamW step on CPU). Here, when a
param group qualifies (CPU float32 dense contiguous tensors, plain float hyper-parameters, no amsgrad,
maximize, capturable or differentiable), phi runs inside a one-pass C kernel that also does the AdamW
update, so its arithmetic hides under the memory traffic AdamW pays anyway. Every other case (CUDA, bf16
parameters, amsgrad, phi already applied before clipping, p = 1, no compiler) applies phi with
:func:`hf_gradpower.power_` and runs torch's own AdamW update (fused or foreach, as configured) on the
same state. On accelerators (CUDA, ROCm, XPU) the same fusion is a Triton kernel, tried first for every
group: see :mod:`hf_gradpower.accel`.

The optimizer *is* a ``torch.optim.AdamW``: same hyper-parameters, state layout and ``state_dict``; ``p``
is the ``gradpower_p`` group key that ``attach`` uses, so ``gradpower_p()``, ``detach``, ``apply_now`` and
checkpoints behave alike. One visible difference: after a one-pass step ``.grad`` still holds g, whereas
the hook path leaves phi(g) there.
"""

from __future__ import annotations

import ctypes
import math

import torch

from hf_gradpower import _kernels, accel
from hf_gradpower._kernels import dense_cpu_f32
from hf_gradpower.adamw_step import adamw_group_step, is_plain_adamw
from hf_gradpower.attach import GROUP_KEY, attach, take_applied_flag, take_clip_coef
from hf_gradpower.transform import DEFAULT_POWER, power_

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
        """One AdamW step on phi_p(g): the one-pass CPU kernel where a group qualifies, else phi then torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        already_applied = take_applied_flag(self)
        coef = take_clip_coef(self)  # from clip_and_power_: phi(g) is multiplied by it
        for group in self.param_groups:
            p = group.get(GROUP_KEY, 1.0) if not already_applied else 1.0
            if p != 1.0 and coef is None and accel.adamw_power_group_step(self, group, p):
                continue  # accelerators: phi fused into AdamW by a Triton kernel (never builds the CPU kernel)
            if p == 1.0 or not _one_pass_step(self, group, p, coef):
                if p != 1.0 or coef is not None:
                    power_((q.grad for q in group["params"]), p, coef=coef)
                adamw_group_step(self, group)
        return loss


def _one_pass_step(optimizer: torch.optim.AdamW, group: dict, p: float, coef: torch.Tensor | None = None) -> bool:
    """AdamW on coef * phi_p(g) for the whole group in ONE C call (one OpenMP region over all its tensors); returns
    False, before any update, if the group doesn't qualify. Devices are checked before the kernel is
    touched, so a step on accelerator (or meta) tensors never builds or validates the CPU kernel."""
    if not is_plain_adamw(group) or not 0.0 < p <= _kernels.FAST_P_MAX or _kernels.kernel_mode() == "eager":
        return False
    params = [q for q in group["params"] if q.grad is not None]
    if not params or not all(dense_cpu_f32(q) and dense_cpu_f32(q.grad) for q in params):
        return False
    if coef is not None and coef.device.type != "cpu":
        return False
    if not _kernels.fast_kernel_available():
        return False
    params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    optimizer._init_group(group, params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    if not all(dense_cpu_f32(s) for s in (*exp_avgs, *exp_avg_sqs)):
        return False
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    hyper_by_step: dict[float, tuple[float, ...]] = {}
    hyper: list[float] = []
    for step_t in steps:
        step_t += 1
        step = float(step_t)
        if step not in hyper_by_step:  # torch's own formulas, in double, rounded once to float32
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            hyper_by_step[step] = (
                1.0 - lr * wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / bias_correction1,
                1.0 / math.sqrt(bias_correction2), eps,
            )
        hyper.extend(hyper_by_step[step])
    _kernels.fast_kernel().adamw_power_many(
        params_, grads, exp_avgs, exp_avg_sqs, p, (ctypes.c_float * len(hyper))(*hyper), torch.get_num_threads(),
        coef=1.0 if coef is None else float(coef),
    )
    return True
