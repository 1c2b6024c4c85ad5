"""Optimizers by name, for any training loop: ``build_optimizer(model, "adampower", lr=1e-3)``.

Names: every registered base optimizer ``X`` (``adamw``, ``muon``, ``adam``, ``sgd``, ``adagrad``,
``rmsprop``, and whatever :func:`register_optimizer` adds) also exists as ``Xpower``, the same
optimizer with GradPower attached. ``adampower`` is the paper's name for ``adamwpower``; it builds
:class:`~hf_gradpower.adampower.AdamPower`, a ``torch.optim.AdamW`` that runs phi and the update in one
pass over memory on CPU (an entry's ``power_cls``); other ``Xpower`` names attach the step pre-hook.
The name alone says whether GradPower is on, so a baseline can never pick up a stray ``p``.

Parameter groups. Given a model, weight decay goes to tensors with ``ndim >= 2`` (or to the names
the caller lists, e.g. Trainer's ``get_decay_parameter_names``). For ``muon``, hidden matrices go
to Muon: 2-D weights and 3-D fused MoE experts, except embeddings, the output head and the MoE
router (``*.gate`` / ``*.router`` / ``*.shared_expert_gate``), which stay with AdamW together with
norms and biases. Every trainable parameter lands in exactly one group; one log line says where.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_gradpower.adampower import AdamPower
from hf_gradpower.attach import attach
from hf_gradpower.muon import MuonAdamW
from hf_gradpower.transform import DEFAULT_POWER, validate_power

logger = logging.getLogger(__name__)

POWER_SUFFIX = "power"
ALIASES = {"adampower": "adamwpower"}
ROUTER_MODULE_NAMES = ("gate", "router", "shared_expert_gate")
# Blockwise LR (Wang et al. 2025, arXiv 2502.19002): peak lr multipliers per Transformer block type.
# The paper's list has no entry for an untied output head; it keeps the base lr here (override "head").
BLOCKWISE_LR_RATIOS = {"embedding": 10.0, "qk": 8.0, "ffn": 6.0, "vo": 4.0, "norm": 1.0, "head": 1.0, "other": 1.0}
SPLIT_PARAM_NAMES = {"gate_up_proj": 2}  # fused [E, 2I, H] gate and up halves: orthogonalise each


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one base optimizer from param groups."""

    cls: type[torch.optim.Optimizer]
    defaults: dict = field(default_factory=dict)
    routes_muon: bool = False  # groups are split into Muon / AdamW groups
    auto_fused: bool = False  # pass fused=True when every parameter supports the fused kernel
    power_cls: type[torch.optim.Optimizer] | None = None  # subclass that applies phi in its own step


_REGISTRY: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(torch.optim.AdamW, auto_fused=True, power_cls=AdamPower),
    "muon": OptimizerEntry(MuonAdamW, routes_muon=True, auto_fused=True),
    "adam": OptimizerEntry(torch.optim.Adam, auto_fused=True),
    "sgd": OptimizerEntry(torch.optim.SGD),
    "adagrad": OptimizerEntry(torch.optim.Adagrad),
    "rmsprop": OptimizerEntry(torch.optim.RMSprop),
}


def register_optimizer(name: str, cls: type[torch.optim.Optimizer], **defaults) -> None:
    """Register ``cls`` as ``name`` (and ``name + 'power'``); ``defaults`` are default kwargs."""
    name = name.lower()
    if name.endswith(POWER_SUFFIX) or name in ALIASES:
        raise ValueError(f"register the base name, not {name!r}: '{name}power' is derived automatically")
    _REGISTRY[name] = OptimizerEntry(cls, dict(defaults))


def available_optimizers() -> list[str]:
    """Every name :func:`build_optimizer` accepts."""
    names = set(_REGISTRY) | {n + POWER_SUFFIX for n in _REGISTRY} | set(ALIASES)
    return sorted(names)


def resolve_name(name: str) -> tuple[str, bool]:
    """``"adampower"`` -> ``("adamw", True)``; ``"sgd"`` -> ``("sgd", False)``; unknown -> ValueError."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in _REGISTRY:
        return key, False
    if key.endswith(POWER_SUFFIX) and key[: -len(POWER_SUFFIX)] in _REGISTRY:
        return key[: -len(POWER_SUFFIX)], True
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(available_optimizers())}")


def is_power_optimizer(name: str) -> bool:
    return resolve_name(name)[1]


def build_optimizer(
    model_or_params: nn.Module | Iterable,
    name: str = "adampower",
    *,
    lr: float,
    weight_decay: float = 0.0,
    p: float = DEFAULT_POWER,
    decay_parameter_names: Iterable[str] | None = None,
    blockwise_lr: bool | dict[str, float] = False,
    split_roles: bool = False,
    **kwargs,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for a model (grouped as described above) or for ready param groups.

    ``p`` is used only by ``*power`` names. ``blockwise_lr``: ``True`` for :data:`BLOCKWISE_LR_RATIOS`,
    or a dict overriding some of them; each block's group gets ``lr * ratio`` (schedulers scale every
    group's own initial lr, so the ratios hold along the schedule). Extra ``kwargs`` go to the base
    optimizer (e.g. ``betas``, ``eps``, ``momentum``). ``split_roles`` also splits groups by
    :func:`role_of` (key ``role``), so each role can get its own ``p`` (``hf_gradpower.p_schedule``).
    """
    base, use_power = resolve_name(name)
    if use_power:
        p = validate_power(p)
    entry = _REGISTRY[base]
    ratios = blockwise_lr_ratios(blockwise_lr)
    if isinstance(model_or_params, nn.Module):
        groups = param_groups(
            model_or_params, weight_decay=weight_decay, route_muon=entry.routes_muon,
            decay_parameter_names=decay_parameter_names, by_block=ratios is not None, by_role=split_roles,
        )
        if ratios is not None:
            for group in groups:
                group["lr"] = lr * ratios[group["block"]]
    elif entry.routes_muon or ratios is not None or split_roles:
        raise ValueError(f"{name!r} with Muon routing, blockwise_lr or roles needs the model, not a parameter list")
    else:
        groups = list(model_or_params)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    options = {"lr": lr, "weight_decay": weight_decay, **entry.defaults, **kwargs}
    if entry.auto_fused and "fused" not in options and "foreach" not in options:
        options["fused"] = _fused_supported(groups)
    cls = entry.power_cls if use_power and entry.power_cls is not None else entry.cls
    optimizer = cls(groups, **options)
    return attach(optimizer, p) if use_power else optimizer


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    route_muon: bool = False,
    decay_parameter_names: Iterable[str] | None = None,
    by_block: bool = False,
    by_role: bool = False,
) -> list[dict]:
    """Trainable parameters of ``model`` as param groups; every parameter in exactly one group.

    ``by_block`` also splits groups by Transformer block type (key ``block``, see :func:`block_of`);
    ``by_role`` by role (key ``role``, see :func:`role_of`).
    """
    decay_names = set(decay_parameter_names) if decay_parameter_names is not None else None
    muon_names = muon_parameter_names(model) if route_muon or by_role else set()
    groups: dict[tuple, dict] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = pname in decay_names if decay_names is not None else param.ndim >= 2
        key: tuple = ("adamw", decays)
        extra: dict = {}
        if route_muon:
            split = _split_of(pname) if pname in muon_names else 1
            use_muon = pname in muon_names
            key = ("muon" if use_muon else "adamw", decays, split)
            extra = {"use_muon": use_muon}
            if use_muon:
                extra["ns_split"] = split
        if by_block:
            block = block_of(pname)
            key, extra = (*key, block), {**extra, "block": block}
        if by_role:
            role = role_of(pname, param, muon_names)
            key, extra = (*key, role), {**extra, "role": role}
        group = groups.setdefault(
            key, {"params": [], "param_names": [], "weight_decay": weight_decay if decays else 0.0, **extra}
        )
        group["params"].append(param)
        group["param_names"].append(pname)
    result = list(groups.values())
    if route_muon:
        logger.info(routing_summary(result))
    return result


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the hidden matrices Muon should own (2-D weights, 3-D experts; no embeddings/head/router)."""
    excluded: set[int] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mname, module in model.named_modules():
        last = mname.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or module is output or last in ROUTER_MODULE_NAMES or last == "lm_head":
            excluded.update(id(p) for p in module.parameters(recurse=False))
    return {
        pname for pname, param in model.named_parameters()
        if param.requires_grad and param.ndim in (2, 3) and id(param) not in excluded
    }


def blockwise_lr_ratios(blockwise_lr: bool | dict[str, float]) -> dict[str, float] | None:
    """``None`` (off), the default ratios, or the defaults updated by a dict; unknown block names refused."""
    if blockwise_lr is False or blockwise_lr is None:
        return None
    overrides = {} if blockwise_lr is True else dict(blockwise_lr)
    unknown = set(overrides) - set(BLOCKWISE_LR_RATIOS)
    if unknown:
        raise ValueError(f"unknown blockwise_lr blocks {sorted(unknown)}; known: {', '.join(BLOCKWISE_LR_RATIOS)}")
    return {**BLOCKWISE_LR_RATIOS, **overrides}


ROLES = ("embedding", "hidden", "experts", "other")


def role_of(pname: str, param: torch.Tensor, hidden_names: set[str]) -> str:
    """Role of a parameter for per-role settings, by the Muon routing: embedding (input and output
    embeddings), experts (MoE expert weights), hidden (other hidden matrices), other (norms, biases, router)."""
    if block_of(pname) in ("embedding", "head"):
        return "embedding"
    if pname not in hidden_names:
        return "other"
    return "experts" if param.ndim == 3 or "experts" in pname.split(".") else "hidden"


def block_of(pname: str) -> str:
    """Block type of a parameter, by its name: embedding, head, qk, vo, ffn (MLP, experts, router), norm."""
    parts = pname.split(".")
    if "embed_tokens" in parts or "wte" in parts or "wpe" in parts:
        return "embedding"
    if "lm_head" in parts:
        return "head"
    if any(n in parts for n in ("q_proj", "k_proj")):
        return "qk"
    if any(n in parts for n in ("v_proj", "o_proj")):
        return "vo"
    if "mlp" in parts or "block_sparse_moe" in parts:
        return "ffn"
    if any("norm" in n for n in parts):
        return "norm"
    return "other"


def routing_summary(groups: list[dict]) -> str:
    """One line: how many tensors / parameters went to Muon and to AdamW."""
    counts = {True: [0, 0], False: [0, 0]}
    for group in groups:
        c = counts[bool(group.get("use_muon"))]
        c[0] += len(group["params"])
        c[1] += sum(p.numel() for p in group["params"])
    (mt, mn), (at, an) = counts[True], counts[False]
    return f"Muon: {mt} tensors, {mn:,} parameters | AdamW: {at} tensors, {an:,} parameters"


def _split_of(pname: str) -> int:
    return SPLIT_PARAM_NAMES.get(pname.rsplit(".", 1)[-1], 1)


def _fused_supported(groups: list[dict]) -> bool:
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(
        isinstance(p, torch.Tensor) and type(p).__name__ != "DTensor" and p.is_floating_point()
        and p.device.type in ("cpu", "cuda")
        for p in params
    )

