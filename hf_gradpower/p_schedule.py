"""p beyond a constant: per-role p, p schedules over steps, and ``auto`` p from the measured gradient noise.

A spec (``--gradpower_p`` or :class:`PowerController`'s ``spec``) is one schedule, or per role
``role=schedule`` items joined by commas (roles: embedding, hidden, experts, other — see
``optimizers.role_of`` — and ``*`` for the rest). A schedule is:

  ``1.2``                  constant
  ``linear:P0:P1[:N]``     P0 -> P1 linearly over the first N steps (default: the whole run), then P1
  ``cosine:P0:P1[:N]``     the same with a half-cosine
  ``wsd:PS:PD``            PS until the LR schedule's decay phase starts (wsd), PD during the decay
  ``auto[:LO:HI]``         every K steps, Example 4.1's best p for the group's measured noise, in [LO, HI]
                           (``hf_gradpower.p_theory.auto_power``; 1.0 until the first decision)

The p in force at step t (0-based: t completed steps) is written into each param group's ``gradpower_p``
before the step, so it is what runs, what ``optimizer.state_dict()`` saves and what is logged. Constant,
ramp and phase schedules are functions of t; ``auto`` depends on the noise seen so far, so its choices are
part of :meth:`PowerController.state_dict` (saved with the checkpoint, restored on resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_gradpower.attach import GROUP_KEY
from hf_gradpower.noise import GradientNoiseMeter
from hf_gradpower.optimizers import ROLES
from hf_gradpower.p_theory import AUTO_RANGE, EPS, auto_power
from hf_gradpower.transform import validate_power

AUTO_START = 1.0  # p of an auto group before its first decision: plain AdamW
DEFAULT_AUTO_EVERY = 10


@dataclass(frozen=True)
class Constant:
    p: float

    def at(self, step: int, run: RunShape) -> float:
        return self.p


@dataclass(frozen=True)
class Ramp:
    p0: float
    p1: float
    kind: str  # linear | cosine
    steps: int | None = None  # None: the whole run

    def at(self, step: int, run: RunShape) -> float:
        length = self.steps or run.max_steps
        x = min(step / length, 1.0) if length > 0 else 1.0
        w = x if self.kind == "linear" else (1 - math.cos(math.pi * x)) / 2
        return self.p0 + (self.p1 - self.p0) * w


@dataclass(frozen=True)
class Phases:
    stable: float
    decay: float

    def at(self, step: int, run: RunShape) -> float:
        if run.decay_start is None:
            raise ValueError("a wsd:PS:PD p schedule needs an LR schedule with a decay phase (warmup_stable_decay)")
        return self.decay if step >= run.decay_start else self.stable


@dataclass(frozen=True)
class Auto:
    lo: float = AUTO_RANGE[0]
    hi: float = AUTO_RANGE[1]


@dataclass(frozen=True)
class RunShape:
    """What schedules need to know about the run: its length and where the LR decay starts (or None)."""

    max_steps: int
    decay_start: int | None = None


def parse_power_spec(spec: str | float) -> dict[str, Constant | Ramp | Phases | Auto]:
    """``{role or '*': schedule}``; one clear ValueError naming the bad part otherwise."""
    if isinstance(spec, (int, float)):
        return {"*": Constant(validate_power(float(spec)))}
    text = str(spec).replace(" ", "")
    if "=" not in text:
        return {"*": _parse_one(text)}
    plan: dict = {}
    for item in text.split(","):
        role, sep, sched = item.partition("=")
        if not sep or role not in (*ROLES, "*"):
            raise ValueError(f"gradpower_p item {item!r}: expected role=schedule with role in {(*ROLES, '*')}")
        if role in plan:
            raise ValueError(f"gradpower_p names role {role!r} twice")
        plan[role] = _parse_one(sched)
    return plan


def _parse_one(text: str):
    """One schedule; a bad exponent keeps ``validate_power``'s message, any other mistake gets the usage line."""
    head, *rest = text.split(":")
    try:
        nums = [float(x) for x in rest] if rest else ([float(head)] if head not in ("auto",) else [])
    except ValueError:
        raise ValueError(_usage(text)) from None
    if not rest and head != "auto":
        return Constant(validate_power(nums[0]))
    if head in ("linear", "cosine") and len(nums) in (2, 3):
        if len(nums) == 3 and (nums[2] < 1 or nums[2] != int(nums[2])):
            raise ValueError(f"gradpower_p {text!r}: the ramp length N must be a positive whole number of steps")
        return Ramp(validate_power(nums[0]), validate_power(nums[1]), head, int(nums[2]) if len(nums) == 3 else None)
    if head == "wsd" and len(nums) == 2:
        return Phases(validate_power(nums[0]), validate_power(nums[1]))
    if head == "auto" and len(nums) in (0, 2):
        lo, hi = (validate_power(x) for x in (nums or AUTO_RANGE))
        if lo > hi:
            raise ValueError(f"gradpower_p {text!r}: auto:LO:HI needs LO <= HI")
        return Auto(lo, hi)
    raise ValueError(_usage(text))


def _usage(text: str) -> str:
    return (f"bad gradpower_p schedule {text!r}: use a number, linear:P0:P1[:N], cosine:P0:P1[:N], "
            "wsd:PS:PD or auto[:LO:HI] (optionally per role: embedding=1.0,hidden=auto,*=1.2)")


def is_constant_spec(spec: str | float) -> bool:
    """True for a single number (p stays fixed: nothing to schedule)."""
    plan = parse_power_spec(spec)
    return set(plan) == {"*"} and isinstance(plan["*"], Constant)


def needs_roles(spec: str | float) -> bool:
    return set(parse_power_spec(spec)) != {"*"}


def needs_noise(spec: str | float) -> bool:
    return any(isinstance(s, Auto) for s in parse_power_spec(spec).values())


class PowerController:
    """Sets each param group's p for the step about to run, from a spec (see the module docstring)."""

    def __init__(self, spec: str | float, every: int = DEFAULT_AUTO_EVERY) -> None:
        if every < 1:
            raise ValueError(f"auto p decision interval must be >= 1 step, got {every}")
        self.plan = parse_power_spec(spec)
        self.every = every
        self.auto_p: dict[int, float] = {}  # group index -> p chosen by auto
        self._schedules: list = []
        self._groups: list[dict] = []
        self._run: RunShape | None = None
        self._meter: GradientNoiseMeter | None = None

    def bind(self, optimizer: torch.optim.Optimizer, run: RunShape, meter: GradientNoiseMeter | None = None):
        """Resolve each group's schedule (by its ``role``); checks the spec covers every group."""
        self._groups, self._run, self._meter = optimizer.param_groups, run, meter
        self._schedules = []
        for i, group in enumerate(self._groups):
            role = group.get("role")
            sched = self.plan.get(role) if role is not None else None
            sched = sched if sched is not None else self.plan.get("*")
            if sched is None:
                raise ValueError(f"gradpower_p gives no p for param group {i} (role {role!r}): add '*=P' or "
                                 f"'{role}=P'")
            if isinstance(sched, Phases):
                sched.at(0, run)  # refuse a wsd p schedule without a decay phase now, not mid-run
            self._schedules.append(sched)
        if meter is None and any(isinstance(s, Auto) for s in self._schedules):
            raise ValueError("gradpower_p auto needs the gradient noise meter (gradpower_noise)")
        return self

    def p_at(self, step: int) -> list[float]:
        """The p of each group at ``step`` (an auto decision, if due, is taken and remembered)."""
        decide = step > 0 and step % self.every == 0 and self._meter is not None and self._meter.steps > 0
        powers = []
        for i, sched in enumerate(self._schedules):
            if isinstance(sched, Auto):
                if decide:
                    s = self._meter.stats(i)
                    eps = float(self._groups[i].get("eps", EPS) or EPS)
                    self.auto_p[i] = auto_power(s["grad_sq"], s["trace_cov"], s["numel"], s["batch_size"], eps,
                                                (sched.lo, sched.hi))
                powers.append(self.auto_p.get(i, AUTO_START))
            else:
                powers.append(float(sched.at(step, self._run)))
        return powers

    def apply(self, step: int) -> list[float]:
        """Write the p of ``step`` into the param groups; returns it."""
        powers = self.p_at(step)
        for group, p in zip(self._groups, powers, strict=True):
            group[GROUP_KEY] = p
        return powers

    def state_dict(self) -> dict:
        return {"auto_p": {str(k): v for k, v in self.auto_p.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.auto_p = {int(k): float(v) for k, v in state.get("auto_p", {}).items()}


def decay_start_of(lr_scheduler_type, lr_scheduler_kwargs: dict | None, warmup_steps: int, max_steps: int):
    """First step of the LR decay phase for transformers' ``warmup_stable_decay``; None for other schedules."""
    if str(getattr(lr_scheduler_type, "value", lr_scheduler_type)) != "warmup_stable_decay":
        return None
    kwargs = lr_scheduler_kwargs or {}
    if "num_stable_steps" in kwargs:
        return int(warmup_steps) + int(kwargs["num_stable_steps"])
    if "num_decay_steps" in kwargs:
        return int(max_steps) - int(kwargs["num_decay_steps"])
    return None
