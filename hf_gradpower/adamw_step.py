"""One AdamW step for one param group: the single place both ``AdamPower`` and ``MuonAdamW`` update AdamW groups.

A neutral module so that the base optimizer (``MuonAdamW``) does not import its GradPower variant.
"""

from __future__ import annotations

import torch

from hf_gradpower.kernels.eager import torch_adamw_


def adamw_group_step(optimizer: torch.optim.AdamW, group: dict) -> None:
    """``torch.optim.AdamW.step`` for one group (same state layout, same fused/foreach kernels).

    Calls the functional update rather than ``super().step()``, which would fire the global step hooks
    a second time (see :mod:`hf_gradpower.attach`).
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
    has_complex = optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if params:
        torch_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group, has_complex)


def is_plain_adamw(group: dict) -> bool:
    """The AdamW options the fused GradPower kernels (C, Triton) implement: decoupled weight
    decay and float hyper-parameters; no amsgrad, maximize, capturable or differentiable."""
    if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
        return False
    if not group.get("decoupled_weight_decay", True):
        return False
    return not any(torch.is_tensor(v) for v in (group["lr"], group["weight_decay"], group["eps"], *group["betas"]))
