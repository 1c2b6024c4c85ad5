"""Muon for the hidden matrices, AdamW for everything else, as one torch optimizer.

This is the hybrid Muon used in practice (Moonlight, arXiv 2502.16982; the paper's Muon baseline):
param groups flagged ``use_muon=True`` take ``torch.optim.Muon``'s update — EMA momentum, Nesterov,
quintic Newton-Schulz orthogonalisation in bf16, decoupled weight decay with the unadjusted lr, and
``adjust_lr_fn="match_rms_adamw"`` (lr * 0.2 * sqrt(max(A, B))) so AdamW's lr and weight decay carry
over unchanged — and all other groups take ``torch.optim.AdamW``'s update, fused where supported.

Why one optimizer: a single ``state_dict``, one LR scheduler that scales both kinds of groups, one
object for Trainer/Accelerate, and GradPower attaches to it like to any other optimizer.

Beyond ``torch.optim.Muon``, 3-D parameters are accepted: fused MoE experts (transformers 5 keeps
Qwen2MoE experts as ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]). Each expert's matrix
is orthogonalised on its own, and a group with ``ns_split=2`` also splits each expert's matrix into
its gate and up halves first, so every orthogonalised matrix is one linear map of the model.
2-D matrices go through torch's own Newton-Schulz and are bit-identical to ``torch.optim.Muon``;
stacks of matrices go through a batched copy of the same iteration.
"""

from __future__ import annotations

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz

from hf_gradpower import accel
from hf_gradpower.adamw_step import adamw_group_step
from hf_gradpower.attach import GROUP_KEY

MUON_DEFAULTS = {
    "use_muon": False,
    "momentum": 0.95,
    "nesterov": True,
    "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    "ns_eps": EPS,
    "ns_steps": 5,
    "ns_split": 1,
    "adjust_lr_fn": "match_rms_adamw",
}

_ADAMW_GROUP_DEFAULTS = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
}


class MuonAdamW(torch.optim.AdamW):
    """Hybrid optimizer: groups with ``use_muon=True`` use Muon, the others AdamW.

    Args mirror ``torch.optim.AdamW`` plus Muon's: ``momentum``, ``nesterov``, ``ns_coefficients``,
    ``ns_eps`` (Muon's ``eps``), ``ns_steps``, ``adjust_lr_fn``. Any of them can be set per group.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        momentum: float = MUON_DEFAULTS["momentum"],
        nesterov: bool = MUON_DEFAULTS["nesterov"],
        ns_coefficients: tuple[float, float, float] = MUON_DEFAULTS["ns_coefficients"],
        ns_eps: float = MUON_DEFAULTS["ns_eps"],
        ns_steps: int = MUON_DEFAULTS["ns_steps"],
        adjust_lr_fn: str | None = MUON_DEFAULTS["adjust_lr_fn"],
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"ns_steps must be in [1, 99], got {ns_steps}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        muon_defaults = dict(
            MUON_DEFAULTS, momentum=momentum, nesterov=nesterov, ns_coefficients=tuple(ns_coefficients),
            ns_eps=ns_eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
        )
        self.defaults.update(muon_defaults)
        for group in self.param_groups:
            for key, value in muon_defaults.items():
                group.setdefault(key, value)
            if group["use_muon"]:
                _check_muon_group(group)
        # GradScaler must unscale for us: the fused AdamW kernel would unscale only the AdamW groups.
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: dict) -> None:
        # Adam's __setstate__ (run by deepcopy, unpickling and load_state_dict) expects a "step"
        # in every state entry; Muon's entries hold only a momentum buffer.
        torch.optim.Optimizer.__setstate__(self, state)
        for group in self.param_groups:
            for key, value in _ADAMW_GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            group["decoupled_weight_decay"] = True

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if self.param_groups[-1].get("use_muon"):
            _check_muon_group(self.param_groups[-1])

    @property
    def applies_gradpower_in_step(self) -> bool:
        """True when GradPower's phi can be fused into a Muon group's momentum (accelerator, p != 1): the
        global GradPower hook then leaves phi to this step (see :func:`hf_gradpower.accel.take_fused_muon_powers`)."""
        return any(accel.fuses_muon_power(g, g.get(GROUP_KEY, 1.0)) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        """One step: Muon on the ``use_muon`` groups, AdamW on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused_powers = accel.take_fused_muon_powers(self) if self.applies_gradpower_in_step else {}
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group, fused_powers.get(id(group), 1.0))
            else:
                adamw_group_step(self, group)
        return loss

    def _muon_group_step(self, group: dict, fused_power: float = 1.0) -> None:
        """``torch.optim.Muon``'s update, extended to stacks of matrices (MoE experts); ``fused_power`` != 1:
        phi_p(g) fused into the momentum update (accelerators)."""
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError("Muon does not support sparse gradients")
            if grad.ndim != param.ndim or param.ndim not in (2, 3):
                raise ValueError(
                    f"Muon got a {param.ndim}-D parameter of shape {tuple(param.shape)}: parameters were "
                    "flattened or sharded (ZeRO/FSDP). Use adampower/adamw with sharded training."
                )
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            if fused_power != 1.0:
                update = accel.muon_power_momentum_(grad, buf, momentum, fused_power, group["nesterov"])
            else:
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            matrices = _as_matrices(update, group["ns_split"])
            if matrices.ndim == 2:
                ortho = _zeropower_via_newtonschulz(matrices, group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
            else:
                ortho = _zeropower_via_newtonschulz_batched(
                    matrices, group["ns_coefficients"], group["ns_steps"], group["ns_eps"]
                )
            adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], matrices.shape[-2:])
            param.mul_(1 - lr * wd)
            param.add_(ortho.view(param.shape), alpha=-adjusted_lr)


def _as_matrices(t: torch.Tensor, split: int) -> torch.Tensor:
    """A 2-D matrix, or a [N, rows, cols] stack: one matrix per expert (and per split part)."""
    if t.ndim == 2 and split == 1:
        return t
    stack = t if t.ndim == 3 else t.unsqueeze(0)
    n, rows, cols = stack.shape
    return stack.reshape(n * split, rows // split, cols)


def _zeropower_via_newtonschulz_batched(
    grads: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """Torch's quintic Newton-Schulz iteration applied to each matrix of a [N, rows, cols] stack."""
    a, b, c = ns_coefficients
    x = grads.bfloat16()
    transposed = grads.size(-2) > grads.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if transposed else x


def _check_muon_group(group: dict) -> None:
    split = group.get("ns_split", 1)
    for param in group["params"]:
        if type(param).__name__ == "DTensor" or param.ndim not in (2, 3):
            raise ValueError(
                f"Muon needs whole 2-D or 3-D (expert-stacked) parameters, got {type(param).__name__} of shape "
                f"{tuple(param.shape)}: Muon/MuonPower on FSDP/ZeRO-sharded parameters is not supported; "
                "use adamw/adampower for sharded training."
            )
        if torch.is_complex(param):
            raise ValueError("Muon does not support complex parameters")
        if param.shape[-2] % split:
            raise ValueError(f"ns_split={split} does not divide the rows of a parameter of shape {tuple(param.shape)}")
