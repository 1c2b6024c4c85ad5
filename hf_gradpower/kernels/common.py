"""What every backend shares: which tensors a kernel can read, and AdamW's scalars computed once in double.

GPUs take Python floats as float32 kernel arguments, so anything derived from a hyper-parameter (``1 - beta``,
bias corrections, ``1 - lr * wd``) is computed here in double and handed over already derived: rounding it
once to float32 is then the only error, as in torch's own Python-scalar arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def plain_dense(t: torch.Tensor) -> bool:
    """A plain strided tensor (no DTensor or other subclass): what a kernel can take by its data pointer."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


@dataclass(frozen=True)
class AdamWScalars:
    """A plain AdamW group's hyper-parameters and what the kernels derive from them, in double."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict) -> AdamWScalars:
        beta1, beta2 = (float(b) for b in group["betas"])
        return cls(float(group["lr"]), beta1, beta2, float(group["eps"]), float(group["weight_decay"]))

    @property
    def decay(self) -> float:
        return 1.0 - self.lr * self.weight_decay

    @property
    def one_minus_beta1(self) -> float:
        return 1.0 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1.0 - self.beta2

    def step_size(self, step):
        """``lr / (1 - beta1**step)``, torch's formula for the step about to be taken (a float, or a float64
        tensor of steps)."""
        return self.lr / (1.0 - self.beta1**step)

    def bias_correction2_sqrt(self, step):
        """``sqrt(1 - beta2**step)`` (a float, or a float64 tensor of steps)."""
        bias_correction2 = 1.0 - self.beta2**step
        return bias_correction2.sqrt() if torch.is_tensor(bias_correction2) else math.sqrt(bias_correction2)
