"""GradPower for Hugging Face: phi_p(g) = sign(g) * |g|^p before any optimizer (arXiv 2505.24275).

Layers, following ``theta <- theta - lr * Q(phi(g))``:
  transform   phi_p itself, on gradients (DTensor shards included)
  kernels     phi and the fused optimizer steps: eager torch, C and Triton backends, self-checked at first use
  attach      GradPower on any torch optimizer (one line)
  clipping    clip(phi(g)) for custom loops: phi and its norm in one pass, the clip coefficient at the step
  adampower   AdamPower: AdamW with phi in its own step (one pass over memory: C kernel, Triton)
  muon        the Muon/AdamW hybrid (Q for MuonPower)
  optimizers  optimizers by name: adamw, adampower, muon, muonpower, sgdpower, ...
  trainer     GradPowerTrainer, GradPowerMixin (any Trainer subclass), GradPowerTrainingArguments (lazy)
"""

from hf_gradpower.adampower import AdamPower
from hf_gradpower.attach import apply_now, attach, detach, gradpower_p, is_attached
from hf_gradpower.clipping import clip_and_power_
from hf_gradpower.muon import MuonAdamW
from hf_gradpower.optimizers import available_optimizers, build_optimizer, register_optimizer
from hf_gradpower.transform import DEFAULT_POWER, power_, sign_power, validate_power

__all__ = [
    "AdamPower",
    "DEFAULT_POWER",
    "GradPowerMixin",
    "GradPowerTrainer",
    "GradPowerTrainingArguments",
    "MuonAdamW",
    "apply_now",
    "attach",
    "available_optimizers",
    "build_optimizer",
    "clip_and_power_",
    "detach",
    "gradpower_p",
    "is_attached",
    "power_",
    "register_optimizer",
    "sign_power",
    "validate_power",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("GradPowerMixin", "GradPowerTrainer", "GradPowerTrainingArguments"):
        from hf_gradpower import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_gradpower' has no attribute {name!r}")
