"""Attach GradPower to any torch optimizer in one line: ``gradpower.attach(optimizer, p=1.2)``.

Design: ``p`` is stored in each param group (key ``gradpower_p``) and one process-wide
``torch.optim`` step pre-hook, registered when this module is imported, applies phi_p to the
gradients of every group that carries the key, right before the base optimizer's own ``step``.

Why a hook on the raw optimizer rather than a wrapper class:
  * the optimizer keeps its class, ``param_groups``, ``state`` and ``state_dict`` — LR schedulers,
    Accelerate's ``AcceleratedOptimizer``, Trainer checkpointing and ``isinstance`` checks see the
    optimizer they expect (wrappers are the classic source of broken checkpoints);
  * it fires once per real step: after gradient accumulation, after the DDP all-reduce, after
    GradScaler's unscale and never when GradScaler skips the step on inf/NaN;
  * ``p`` lives in the param groups, so it is saved in ``optimizer.state_dict()``, restored by
    ``load_state_dict`` into a freshly built optimizer, and survives ``copy.deepcopy``/pickling —
    per-instance hooks would silently vanish in each of those cases;
  * the hook reads ``optimizer.grad_scale``, which GradScaler sets when the optimizer unscales inside
    its own kernel (fused Adam/AdamW): those gradients still carry the loss scale and are transformed
    as ``s * phi(g / s)``.

Caveat: torch wraps each optimizer class's own ``step`` with the hooks, so a subclass whose ``step``
calls ``super().step()`` fires them twice (phi would be applied twice). Build such optimizers by
calling the functional update (as ``MuonAdamW`` does) rather than ``super().step()``.

The optimizer the user built decides: only an optimizer that was attached (``attach`` puts ``p`` in its
``defaults`` too) gets phi. A baseline that loads a GradPower checkpoint receives param groups carrying
``gradpower_p``; it ignores them, drops them at its next step with one warning, and stays the baseline.

Order with clipping: by default the hook runs at ``step``, i.e. after any clipping you did.
The paper's order is power first, clip(phi(g)). Two ways to get it in a custom loop:
  * :func:`hf_gradpower.clip_and_power_` in place of ``clip_grad_norm_`` (the default of ``GradPowerTrainer``):
    phi(g) and its norm in one pass, and the next ``step`` applies the clip coefficient in its own pass over
    the gradients (on accelerators the norm pass only reads and the step applies phi too);
  * :func:`apply_now` before ``clip_grad_norm_``: phi is written into the gradients now and the hook skips
    that step (a pass of its own, then clipping's two).
"""

from __future__ import annotations

import logging

import torch
import torch.optim.optimizer as torch_optimizer

from hf_gradpower.transform import DEFAULT_POWER, power_, validate_power

logger = logging.getLogger(__name__)

GROUP_KEY = "gradpower_p"
_APPLIED_FLAG = "_gradpower_applied_this_step"
_CLIP_COEF = "_gradpower_clip_coef"  # set by clipping.clip_and_power_, taken by the next step


def attach(optimizer: torch.optim.Optimizer, p: float = DEFAULT_POWER) -> torch.optim.Optimizer:
    """Make ``optimizer`` apply phi_p to its gradients at every step; returns the same optimizer.

    ``p = 1`` keeps the key (so checkpoints say what ran) but leaves the updates bit-identical.
    Param groups added later (``add_param_group``) inherit ``p`` through ``optimizer.defaults``.
    """
    optimizer = inner_optimizer(optimizer)
    p = validate_power(p)
    for group in optimizer.param_groups:
        group[GROUP_KEY] = p
    optimizer.defaults[GROUP_KEY] = p
    if _keep_power_on_load not in getattr(optimizer, "_optimizer_load_state_dict_pre_hooks", {}).values():
        optimizer.register_load_state_dict_pre_hook(_keep_power_on_load)
    return optimizer


def detach(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Remove GradPower from ``optimizer`` (it becomes its bare base optimizer again)."""
    optimizer = inner_optimizer(optimizer)
    for group in optimizer.param_groups:
        group.pop(GROUP_KEY, None)
    optimizer.defaults.pop(GROUP_KEY, None)
    return optimizer


def is_attached(optimizer: torch.optim.Optimizer) -> bool:
    """True if GradPower was attached to ``optimizer`` (not merely loaded from a checkpoint's param groups)."""
    return GROUP_KEY in inner_optimizer(optimizer).defaults


def gradpower_p(optimizer: torch.optim.Optimizer) -> float | None:
    """The ``p`` of the optimizer (``None`` if GradPower is not attached); raises if groups disagree."""
    optimizer = inner_optimizer(optimizer)
    if not is_attached(optimizer):
        return None
    powers = {g.get(GROUP_KEY) for g in optimizer.param_groups}
    if len(powers) > 1:
        raise ValueError(f"param groups carry different gradpower p values: {sorted(map(str, powers))}")
    return powers.pop() if powers else None


@torch.no_grad()
def apply_now(optimizer: torch.optim.Optimizer, *, grad_scale: torch.Tensor | float | None = None) -> None:
    """Transform the gradients now (e.g. before clipping) and skip the transform at the next ``step``.

    ``grad_scale`` is the loss scale the gradients still carry, if any (GradScaler before unscale_).
    For clip(phi(g)), :func:`hf_gradpower.clip_and_power_` in place of this + ``clip_grad_norm_`` gives the same
    update with fewer passes over the gradients (the norm of phi read only; phi and the coefficient at the step).
    """
    optimizer = inner_optimizer(optimizer)
    power_groups_(optimizer, grad_scale=grad_scale)
    mark_applied(optimizer, "apply_now")


def mark_applied(optimizer: torch.optim.Optimizer, by: str) -> None:
    """Record that ``by`` (``"apply_now"`` or ``"clip_and_power_"``) wrote phi into the gradients: the next
    ``step`` must not apply it again."""
    setattr(optimizer, _APPLIED_FLAG, by)


def take_applied_flag(optimizer: torch.optim.Optimizer) -> str | None:
    """Once, the name of the function that wrote phi into the gradients for this step (see :func:`mark_applied`),
    or None (for optimizers that apply phi in ``step``)."""
    applied = getattr(optimizer, _APPLIED_FLAG, None)
    setattr(optimizer, _APPLIED_FLAG, None)
    return applied or None


def set_clip_coef(optimizer: torch.optim.Optimizer, coef: torch.Tensor | None) -> None:
    """Leave the clip coefficient (a 0-d tensor; None: none) for the next ``step``, which multiplies phi(g) by it."""
    setattr(optimizer, _CLIP_COEF, coef)


def take_clip_coef(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The clip coefficient :func:`hf_gradpower.clip_and_power_` left for this step (once), or None.

    A step that GradScaler skips (inf/nan) never takes it; the next ``clip_and_power_`` replaces it."""
    coef = getattr(optimizer, _CLIP_COEF, None)
    setattr(optimizer, _CLIP_COEF, None)
    return coef


def power_groups_(optimizer: torch.optim.Optimizer, *, grad_scale=None, coef: torch.Tensor | None = None,
                  phi: bool = True, skip: frozenset = frozenset()) -> None:
    """Gradients of every group (except ``id(group)`` in ``skip``) <- ``coef * phi_p(g)`` in one pass.

    ``phi=False`` (phi already applied) or p = 1: only the multiplication by ``coef``, if any."""
    if not is_attached(optimizer):
        _drop_loaded_power(optimizer)
    for group in optimizer.param_groups:
        if id(group) in skip:
            continue
        p = group.get(GROUP_KEY, 1.0) if phi else 1.0
        if p != 1.0 or coef is not None:
            power_((q.grad for q in group["params"]), p, grad_scale=grad_scale, coef=coef)


def _step_pre_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global ``Optimizer.step`` pre-hook: phi_p on the groups that carry ``gradpower_p``."""
    if _wraps_optimizer(optimizer):
        return  # a wrapper steps its inner optimizer, whose own step fires this hook
    if getattr(optimizer, "applies_gradpower_in_step", False):
        return  # e.g. AdamPower: phi (and a clip coefficient) is part of its own step
    applied, coef = take_applied_flag(optimizer), take_clip_coef(optimizer)
    if applied and coef is None:
        return
    if not is_attached(optimizer):
        _drop_loaded_power(optimizer)
        return
    if coef is None and not any(group.get(GROUP_KEY, 1.0) != 1.0 for group in optimizer.param_groups):
        return
    if "grad_scaler" in kwargs:
        raise NotImplementedError(
            f"{type(optimizer).__name__}.step received grad_scaler=...: GradPower cannot see the loss scale "
            "there. Call scaler.unscale_(optimizer) before scaler.step(optimizer)."
        )
    # GradScaler sets grad_scale on optimizers that unscale inside their kernel (fused Adam/AdamW);
    # it is None when the gradients were already unscaled (unscale_ or clipping ran first).
    power_groups_(optimizer, grad_scale=getattr(optimizer, "grad_scale", None), coef=coef, phi=not applied)


def _drop_loaded_power(optimizer: torch.optim.Optimizer) -> None:
    """A never-attached optimizer stays a baseline: drop ``p`` its groups got from a GradPower checkpoint."""
    loaded = sorted({str(g.pop(GROUP_KEY)) for g in optimizer.param_groups if GROUP_KEY in g})
    if loaded:
        logger.warning(
            "%s was built without GradPower but loaded param groups with gradpower p=%s (a GradPower checkpoint): "
            "ignored, it stays the baseline. To train with GradPower, build it with hf_gradpower.attach(optimizer, p) "
            "or a '*power' optimizer name.", type(optimizer).__name__, ", ".join(loaded),
        )


def _keep_power_on_load(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Loading a checkpoint saved without GradPower must not silently drop the attached ``p``."""
    attached = optimizer.defaults.get(GROUP_KEY)
    if attached is None:
        return state_dict
    state_dict["param_groups"] = [dict(group) for group in state_dict["param_groups"]]  # not the caller's
    for group in state_dict["param_groups"]:
        saved = group.setdefault(GROUP_KEY, attached)
        if saved != attached:
            logger.warning("optimizer checkpoint has gradpower p=%s; it replaces the attached p=%s", saved, attached)
    return state_dict


def _wraps_optimizer(optimizer) -> bool:
    return isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)


def inner_optimizer(optimizer):
    """The innermost torch optimizer (Accelerate's ``AcceleratedOptimizer`` and similar wrap one)."""
    while _wraps_optimizer(optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"gradpower needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _register_once() -> None:
    """One global hook per process, even if this module is reloaded."""
    marker = "_hf_gradpower_hook_handle"
    old = getattr(torch_optimizer, marker, None)
    if old is not None:
        old.remove()
    setattr(torch_optimizer, marker, torch_optimizer.register_optimizer_step_pre_hook(_step_pre_hook))


_register_once()
