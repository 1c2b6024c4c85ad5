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
stacks of matrices go through a batched copy of the same iteration. On CPUs without bf16 matrix
instructions (no AVX-512: torch multiplies bf16 there with a scalar loop), the same bf16 iteration runs its
products as fp32 GEMMs of the bf16 values, rounded to bf16 once per product (see
:func:`newton_schulz_in_fp32_gemms`).

Sharded parameters: FSDP2 ``DTensor`` shards keep momentum, weight decay and the update on each rank;
Newton-Schulz runs per owner rank (:mod:`hf_gradpower.muon_sharded`), bit-identical to one process.
``distribute_ns=True`` splits Newton-Schulz across DDP ranks the same way. FSDP1/ZeRO flat parameters
are refused.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.distributed as dist
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr, _zeropower_via_newtonschulz

from hf_gradpower.adamw_step import adamw_group_step
from hf_gradpower.attach import GROUP_KEY, is_attached, power_groups_, take_applied_flag, take_clip_coef
from hf_gradpower.kernels import dispatch
from hf_gradpower.muon_sharded import (
    MatrixJob,
    NewtonSchulzStats,
    check_shardable,
    is_dtensor,
    orthogonalise_replicated,
    orthogonalise_sharded,
)

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
        distribute_ns: bool = False,
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
        # Under DDP (replicated plain tensors), split Newton-Schulz across ranks and all-gather the results.
        # FSDP2 DTensor parameters always take the owner route (muon_sharded); this flag is not needed there.
        self.distribute_ns = distribute_ns
        self.ns_stats = NewtonSchulzStats()
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
        global GradPower hook then leaves phi to this step (see :func:`take_fused_muon_powers`). Never for a
        baseline that merely loaded a GradPower checkpoint (not attached): it stays the baseline."""
        return is_attached(self) and any(fuses_muon_power(g, g.get(GROUP_KEY, 1.0)) for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        """One step: Muon on the ``use_muon`` groups, AdamW on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused_powers, coef = take_fused_muon_powers(self) if self.applies_gradpower_in_step else ({}, None)
        muon_groups = [group for group in self.param_groups if group["use_muon"]]
        if muon_groups:
            self._muon_step(muon_groups, fused_powers, coef)
        for group in self.param_groups:
            if not group["use_muon"]:
                adamw_group_step(self, group)
        return loss

    def _muon_step(self, groups: list[dict], fused_powers: dict[int, float] | None = None,
                   coef: torch.Tensor | None = None) -> None:
        """``torch.optim.Muon``'s update, extended to stacks of matrices (MoE experts) and to sharded parameters.

        Momentum, weight decay and the update run on each rank's own shard; only Newton-Schulz needs whole
        matrices, and :mod:`hf_gradpower.muon_sharded` brings each one to a single owner rank.
        ``fused_powers[id(group)] = p``: ``coef * phi_p(g)`` fused into that group's momentum update (accelerators;
        ``coef``: the clip coefficient :func:`hf_gradpower.clip_and_power_` left, or None).
        """
        entries, sharded, replicated = [], {}, []
        self.ns_stats.orthogonalised_numel = 0
        distribute = self.distribute_ns and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for group in groups:
            orthogonalise = self.ns_stats.counting(partial(
                orthogonalise_update, split=group["ns_split"], ns_coefficients=group["ns_coefficients"],
                ns_steps=group["ns_steps"], eps=group["ns_eps"],
            ))
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                _check_muon_grad(param, grad)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf, local_grad = _local(state["momentum_buffer"]), _local(grad)
                fused_power = (fused_powers or {}).get(id(group), 1.0)
                if fused_power != 1.0:
                    update = dispatch.muon_momentum_(local_grad, buf, group["momentum"], fused_power,
                                                     group["nesterov"], coef=coef)  # fmt: skip
                else:
                    buf.lerp_(local_grad, 1 - group["momentum"])
                    update = local_grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                job = MatrixJob(tuple(param.shape), update, orthogonalise)
                if is_row_sharded_matrix(param):
                    sharded.setdefault(param.device_mesh.get_group(), []).append(job)
                elif distribute and not is_dtensor(param):
                    replicated.append(job)
                else:  # whole matrices here: plain tensors, replicated DTensors, expert stacks sharded by expert
                    job.result = orthogonalise(update) if update.numel() else update
                entries.append((param, group, job))
        for process_group, jobs in sharded.items():
            self.ns_stats.bytes_communicated += orthogonalise_sharded(jobs, process_group)
        self.ns_stats.bytes_communicated += orthogonalise_replicated(replicated)
        for param, group, job in entries:
            lr, shape = group["lr"], param.shape
            adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], (shape[-2] // group["ns_split"], shape[-1]))
            local = _local(param)
            local.mul_(1 - lr * group["weight_decay"])
            local.add_(job.result.reshape(local.shape), alpha=-adjusted_lr)


def fuses_muon_power(group: dict, p: float) -> bool:
    """Whether a Muon group's phi_p can run inside its momentum kernel (every gradient, or its local shard,
    served by a fused backend that passed its self-check)."""
    if not group.get("use_muon") or p == 1.0:
        return False
    return dispatch.fuses_muon([_local(q.grad) for q in group["params"] if q.grad is not None])


def take_fused_muon_powers(optimizer: torch.optim.Optimizer) -> tuple[dict[int, float], torch.Tensor | None]:
    """For ``MuonAdamW.step``: ``{id(group): p}`` of the Muon groups whose phi this step fuses into the momentum,
    and the clip coefficient :func:`hf_gradpower.clip_and_power_` left (None if none).

    Called only when ``applies_gradpower_in_step`` made the global hook stand aside: unless
    :func:`hf_gradpower.apply_now` already transformed the gradients, the other groups get phi (times the
    coefficient) here, in one pass over their gradients.
    """
    applied, coef = take_applied_flag(optimizer), take_clip_coef(optimizer)
    fused = {}
    for group in optimizer.param_groups:
        p = group.get(GROUP_KEY, 1.0)
        if not applied and fuses_muon_power(group, p):
            fused[id(group)] = p
    power_groups_(optimizer, coef=coef, phi=not applied, skip=frozenset(fused))
    return fused, coef


def orthogonalise_update(
    update: torch.Tensor, *, split: int, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """Newton-Schulz of each matrix of ``update`` (a 2-D matrix or a [E, rows, cols] stack), same shape, bf16."""
    matrices = _as_matrices(update, split)
    if newton_schulz_in_fp32_gemms(matrices.device):
        ortho = _zeropower_via_newtonschulz_batched(matrices, ns_coefficients, ns_steps, eps, fp32_gemms=True)
    elif matrices.ndim == 2:
        ortho = _zeropower_via_newtonschulz(matrices, ns_coefficients, ns_steps, eps)
    else:
        ortho = _zeropower_via_newtonschulz_batched(matrices, ns_coefficients, ns_steps, eps)
    return ortho.reshape(update.shape)  # the transposed (rows < cols) result is not contiguous: no view


def newton_schulz_in_fp32_gemms(device: torch.device) -> bool:
    """Whether Newton-Schulz on ``device`` computes its bf16 products with fp32 GEMMs: on CPUs whose torch has
    no bf16 GEMM (oneDNN needs AVX-512), a bf16 product runs 15-60x slower than the fp32 one."""
    return device.type == "cpu" and not _cpu_has_bf16_gemm()


@cache
def _cpu_has_bf16_gemm() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def is_row_sharded_matrix(param: torch.Tensor) -> bool:
    """A 2-D DTensor split by rows over more than one rank: its Newton-Schulz needs the other ranks' rows."""
    if not is_dtensor(param) or param.ndim != 2 or param.device_mesh.size() == 1:
        return False
    from torch.distributed.tensor import Shard

    return isinstance(param.placements[0], Shard)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _check_muon_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise ValueError("Muon does not support sparse gradients")
    if grad.ndim != param.ndim or param.ndim not in (2, 3):
        raise ValueError(
            f"Muon got a {param.ndim}-D parameter of shape {tuple(param.shape)}: parameters were flattened "
            "(ZeRO, FSDP1). Muon needs whole matrices or FSDP2 (fully_shard) DTensor shards: use FSDP2, or adampower."
        )
    check_shardable(param)


def _as_matrices(t: torch.Tensor, split: int) -> torch.Tensor:
    """A 2-D matrix, or a [N, rows, cols] stack: one matrix per expert (and per split part)."""
    if t.ndim == 2 and split == 1:
        return t
    stack = t if t.ndim == 3 else t.unsqueeze(0)
    n, rows, cols = stack.shape
    return stack.reshape(n * split, rows // split, cols)


def _zeropower_via_newtonschulz_batched(
    grads: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
    fp32_gemms: bool = False,
) -> torch.Tensor:
    """Torch's quintic bf16 Newton-Schulz iteration applied to each matrix of a [N, rows, cols] stack (or to one
    2-D matrix with ``fp32_gemms``).

    ``fp32_gemms``: each product is an fp32 GEMM of bf16 values, rounded to bf16 once. A product of two bf16
    numbers is exact in fp32, and torch's bf16 GEMM accumulates in fp32 and rounds once, so only the order of the
    fp32 sums differs from torch's route: the results differ by a fraction of bf16 Newton-Schulz's own rounding
    error (``tests/test_muon.py`` measures both against float64).
    """
    a, b, c = ns_coefficients
    x = grads.bfloat16()
    transposed = grads.size(-2) > grads.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    stack = x.float() if fp32_gemms else x
    if stack.ndim == 2:
        stack = stack.unsqueeze(0)
    rounded = (lambda t: t.bfloat16().float()) if fp32_gemms else (lambda t: t)
    for _ in range(ns_steps):
        gram = rounded(stack @ stack.mT)
        gram_update = rounded(torch.baddbmm(gram, gram, gram, beta=b, alpha=c))
        stack = rounded(torch.baddbmm(stack, gram_update, stack, beta=a))
    x = stack.bfloat16().reshape(x.shape)
    return x.mT if transposed else x


def _check_muon_group(group: dict) -> None:
    split = group.get("ns_split", 1)
    for param in group["params"]:
        if param.ndim not in (2, 3):
            raise ValueError(
                f"Muon needs 2-D or 3-D (expert-stacked) parameters, got shape {tuple(param.shape)}: parameters "
                "flattened by FSDP1/ZeRO are not supported; use FSDP2 (fully_shard), or adamw/adampower."
            )
        check_shardable(param)
        if torch.is_complex(param):
            raise ValueError("Muon does not support complex parameters")
        if param.shape[-2] % split:
            raise ValueError(f"ns_split={split} does not divide the rows of a parameter of shape {tuple(param.shape)}")
