"""GradPower in ``transformers.Trainer``: the only Trainer-aware module of the package.

``GradPowerTrainer`` is ``GradPowerMixin`` on ``Trainer``; the mixin composes the same way with any
Trainer subclass (``class MyTrainer(GradPowerMixin, SFTTrainer)``). It differs from ``Trainer`` in
``create_optimizer`` (our optimizers by name, with Trainer's weight-decay grouping and ``adam_beta1/2``,
``adam_epsilon``, ``optim_args``) and in where phi runs relative to gradient clipping. Everything else —
schedulers, gradient accumulation, bf16/fp16, checkpointing and resume, logging — is Trainer's own.

p (``gradpower_p``) is a number or a schedule spec (per role, ramps, wsd phases, ``auto``: see
``hf_gradpower.p_schedule``); ``gradpower_noise`` measures the gradient noise scale (``hf_gradpower.noise``)
on the raw gradients, before phi and clipping. Both run in :class:`GradPowerNoiseCallback`, whose state
(noise EMAs, auto choices) is saved in ``trainer_state.json`` and restored on resume; the values are
logged with the train loss (``noise/b_simple``, ``noise/grad_sq``, ``noise/trace_cov``, ``noise/adam_snr``,
``gradpower_p``).

Order (``gradpower_order``):
  * ``"before_clip"`` (default, the paper's Algorithm 1: clip(phi(g))): ``_clip_grad_norm`` runs
    :func:`hf_gradpower.clip_and_power_`: the norm of phi(g) from one pass (on a CPU it also writes phi; on an
    accelerator it only reads), and the optimizer step applies the clip coefficient (and phi, if not written) in
    its own pass (under fp16 the norm is that of phi(g / s), s the
    loss scale the gradients still carry). The logged ``grad_norm`` is that of phi(g). Under DeepSpeed,
    FSDP1, XLA or mixed device meshes phi is written into the gradients first and Trainer clips them.
  * ``"after_clip"`` (phi(clip(g))): phi runs in the optimizer's step pre-hook; ``grad_norm`` is
    that of g. This is also what a plain ``Trainer`` with :func:`optimizer_cls_and_kwargs` does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_gradpower.attach import GROUP_KEY, apply_now, inner_optimizer
from hf_gradpower.checkpoints import resolve_resume
from hf_gradpower.clipping import clip_and_power_
from hf_gradpower.noise import DEFAULT_NOISE_EVERY, GradientNoiseMeter, adam_snr
from hf_gradpower.optimizers import available_optimizers, build_optimizer, resolve_name
from hf_gradpower.p_schedule import (
    AUTO_START,
    DEFAULT_AUTO_EVERY,
    PowerController,
    RunShape,
    decay_start_of,
    is_constant_spec,
    needs_noise,
    needs_roles,
    parse_power_spec,
)
from hf_gradpower.transform import DEFAULT_POWER, validate_power

logger = logging.getLogger(__name__)

ORDERS = ("before_clip", "after_clip")
_ADAM_LIKE = ("adamw", "adam", "muon")


@dataclass
class GradPowerTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also takes ``adampower``, ``muon``, ``muonpower``, ``sgdpower``...

    ``TrainingArguments`` itself rejects optimizer names it does not know, so our names are kept
    aside while it validates the rest.
    """

    optim: str = field(
        default="adampower",
        metadata={"help": f"Optimizer: one of {', '.join(available_optimizers())}, or any transformers optim name."},
    )
    gradpower_p: str = field(  # a float after parsing when it is a plain number
        default=DEFAULT_POWER,
        metadata={"help": "GradPower exponent p (*power optimizers): a number, linear:P0:P1[:N], cosine:P0:P1[:N], "
                  "wsd:PS:PD, auto[:LO:HI], or per role: embedding=1.0,hidden=auto,experts=1.1,*=1.2."},
    )
    gradpower_noise: bool = field(
        default=False,
        metadata={"help": "Measure and log the gradient noise scale B_simple (on for gradpower_p auto)."},
    )
    gradpower_noise_every: int = field(
        default=DEFAULT_NOISE_EVERY,
        metadata={"help": "Measure the gradient noise every N-th optimizer step (the hooks are off in between)."},
    )
    gradpower_p_every: int = field(
        default=DEFAULT_AUTO_EVERY, metadata={"help": "Steps between two auto p decisions."}
    )
    blockwise_lr: bool = field(
        default=False,
        metadata={"help": "Blockwise LR (Wang et al. 2025): lr x 10 embedding, 8 QK, 6 FFN, 4 VO, 1 norm/head."},
    )
    gradpower_order: str = field(
        default="before_clip",
        metadata={"help": "Apply phi_p before gradient clipping (paper) or after it.", "choices": list(ORDERS)},
    )

    def __post_init__(self):
        self.gradpower_p = normalize_power_spec(self.gradpower_p)
        if needs_noise(self.gradpower_p):
            self.gradpower_noise = True
        for name in ("gradpower_p_every", "gradpower_noise_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gradpower_order not in ORDERS:
            raise ValueError(f"gradpower_order must be one of {ORDERS}, got {self.gradpower_order!r}")
        name = str(getattr(self.optim, "value", self.optim))
        if not is_gradpower_optim(name):
            super().__post_init__()
            return
        self.optim = "adamw_torch"  # a name TrainingArguments accepts, while it validates the rest
        super().__post_init__()
        self.optim = name.lower()


def normalize_power_spec(spec) -> float | str:
    """A plain number becomes a validated float; a schedule spec is checked and kept as text."""
    try:
        return validate_power(float(spec))
    except (TypeError, ValueError) as err:
        if isinstance(spec, (int, float)):
            raise err
    parse_power_spec(spec)
    return str(spec).replace(" ", "")


def is_gradpower_optim(name: str) -> bool:
    """True for the names this package builds (``adamw``, ``adampower``, ``muon``, ``sgdpower``...)."""
    try:
        resolve_name(name)
    except ValueError:
        return False
    return True


class GradPowerMixin:
    """GradPower for any ``Trainer`` subclass: ``class MyTrainer(GradPowerMixin, SFTTrainer)``.

    Builds AdamPower / MuonPower / any ``*power`` optimizer from ``args.optim`` (``create_optimizer``), applies
    phi before clipping in the paper's order (``_clip_grad_norm``), and refuses setups that would silently
    train without GradPower. It must come before the Trainer class in the bases, so its methods win.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if Trainer in cls.__mro__ and cls.__mro__.index(Trainer) < cls.__mro__.index(GradPowerMixin):
            raise TypeError(f"class {cls.__name__}: put GradPowerMixin first in its bases, e.g. "
                            f"class {cls.__name__}(GradPowerMixin, Trainer), or Trainer's methods hide GradPower's")

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_process_count(training_args)
        super().__init__(*args, **kwargs)
        self._check_gradpower_setup()
        self._add_noise_callback()

    def _add_noise_callback(self) -> None:
        spec = getattr(self.args, "gradpower_p", DEFAULT_POWER)
        scheduled = (self._uses_gradpower_optim() and resolve_name(str(self.args.optim))[1]
                     and not is_constant_spec(spec))
        if not (scheduled or getattr(self.args, "gradpower_noise", False)) or self._noise_callback() is not None:
            return
        self.add_callback(GradPowerNoiseCallback(
            spec=spec if scheduled else None, every=getattr(self.args, "gradpower_p_every", DEFAULT_AUTO_EVERY),
            measure_noise=bool(getattr(self.args, "gradpower_noise", False)),
            noise_every=getattr(self.args, "gradpower_noise_every", DEFAULT_NOISE_EVERY),
        ))

    def _noise_callback(self) -> GradPowerNoiseCallback | None:
        """Looked up each time: resuming replaces the callback with one rebuilt from the checkpoint."""
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, GradPowerNoiseCallback)), None)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Trainer's log; the train-loss entries also carry the noise and the p in force."""
        callback = self._noise_callback()
        if callback is not None and "loss" in logs and self.optimizer is not None:
            logs = {**logs, **callback.log_values(self.optimizer)}
        return super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, except that ``resume_from_checkpoint=True`` skips an unreadable checkpoint.

        Trainer writes checkpoints in place, so a process killed while saving leaves a newest folder that
        Trainer's own ``True`` would pick and fail on (or half-load); the newest readable one is used instead
        (``checkpoints.resolve_resume``).
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = resolve_resume(True, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _uses_gradpower_optim(self) -> bool:
        return is_gradpower_optim(str(self.args.optim)) and self.optimizer_cls_and_kwargs is None

    def _check_gradpower_setup(self) -> None:
        """Refuse combinations that would silently train without GradPower or with wrong updates."""
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not self.is_fsdp_enabled:
            logger.warning(  # Accelerate selects FSDP only on GPU-type setups; on CPU it falls back to DDP
                "accelerate was launched with an FSDP config but this run is not sharded (%s): every process holds "
                "the whole model and optimizer state. Shard on GPUs, or with torch's fully_shard (see README).",
                self.accelerator.distributed_type,
            )
        if not self._uses_gradpower_optim():
            return
        base, use_power = resolve_name(str(self.args.optim))
        order = getattr(self.args, "gradpower_order", "after_clip")
        if self.is_deepspeed_enabled:
            ds_config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", {}) or {}
            if "optimizer" in ds_config:
                raise ValueError(
                    f"the DeepSpeed config has its own 'optimizer' block, so Trainer would never call "
                    f"create_optimizer and {self.args.optim} would be silently replaced; remove the block."
                )
            if use_power and order == "before_clip" and self.args.max_grad_norm > 0:
                raise ValueError(
                    "DeepSpeed clips gradients inside its engine, so GradPower cannot run before clipping; "
                    "pass --gradpower_order after_clip."
                )
        if base == "muon" and (self.is_deepspeed_enabled or 1 in self._fsdp_versions()):
            raise ValueError(
                f"{self.args.optim} cannot run on parameters flattened by DeepSpeed ZeRO or FSDP1 (Muon needs whole "
                "matrices); use FSDP2 (fsdp_config version 2, the default; Newton-Schulz runs per owner rank), or DDP."
            )

    def _fsdp_versions(self) -> set:
        """FSDP versions requested by the arguments or set up by Accelerate (empty without FSDP)."""
        versions = {(getattr(self.args, "fsdp_plugin_args", None) or {}).get("fsdp_version")}
        if self.is_fsdp_enabled:
            versions.add(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1))
        return versions - {None}

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self._uses_gradpower_optim():
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        base, _ = resolve_name(str(self.args.optim))
        spec = getattr(self.args, "gradpower_p", DEFAULT_POWER)
        constant = is_constant_spec(spec)
        self.optimizer = build_optimizer(
            opt_model,
            self.args.optim,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            p=float(spec) if constant else AUTO_START,  # a schedule sets each group's p before every step
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
            blockwise_lr=getattr(self.args, "blockwise_lr", False),
            split_roles=not constant and needs_roles(spec),
            **optimizer_kwargs_from_args(self.args, base),
        )
        return self.optimizer

    def _clip_grad_norm(self, model):
        callback = self._noise_callback()
        if callback is not None and callback.meter is not None:
            callback.meter.measure(grad_scale=self._pending_loss_scale())  # raw: before phi and clipping
        if getattr(self.args, "gradpower_order", "after_clip") == "before_clip":
            if self._clips_with_power(model):
                return clip_and_power_(self.optimizer, self.args.max_grad_norm, grad_scale=self._pending_loss_scale())
            apply_now(self.optimizer, grad_scale=self._pending_loss_scale())
        return super()._clip_grad_norm(model)

    def _clips_with_power(self, model) -> bool:
        """Whether clip_and_power_ stands in for Trainer's clipping: GradPower with some p != 1 on plain, DDP or
        FSDP2 gradients (DeepSpeed, FSDP1 and XLA clip inside their own engines; mixed meshes take Trainer's own
        reduction; without phi Trainer's clipping is the same thing)."""
        from accelerate.utils import DistributedType

        optimizer = inner_optimizer(self.optimizer)
        if not any(group.get(GROUP_KEY, 1.0) != 1.0 for group in optimizer.param_groups):
            return False
        kind = self.accelerator.distributed_type
        if kind in (DistributedType.DEEPSPEED, DistributedType.XLA) or (kind == DistributedType.FSDP and not
                                                                         self.accelerator.is_fsdp2):
            return False
        return not self._has_mixed_mesh_grads(model)

    def _pending_loss_scale(self):
        """The fp16 loss scale the gradients still carry at clipping time, or None."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # a device tensor: no host sync


class GradPowerTrainer(GradPowerMixin, Trainer):
    """``transformers.Trainer`` that builds AdamPower / MuonPower / any ``*power`` optimizer from ``args.optim``."""


class GradPowerNoiseCallback(TrainerCallback, ExportableState):
    """Measures the gradient noise and sets the scheduled p each step; its state rides in the checkpoint.

    ``spec``: a p schedule (``None``: p is left alone); ``measure_noise``: run the noise meter, on every
    ``noise_every``-th optimizer step (its gradient hooks are removed in between, so other steps pay nothing).
    ``GradPowerTrainer`` measures in ``_clip_grad_norm`` (before phi and clipping); without clipping the
    measurement happens here, in ``on_pre_optimizer_step``, before the optimizer step applies phi.
    """

    def __init__(self, spec: str | float | None = None, every: int = DEFAULT_AUTO_EVERY,
                 measure_noise: bool = True, noise_every: int = 1) -> None:
        if noise_every < 1:
            raise ValueError(f"noise_every must be >= 1, got {noise_every}")
        self.spec, self.every, self.measure_noise, self.noise_every = spec, every, measure_noise, noise_every
        self.controller = PowerController(spec, every) if spec is not None else None
        self.meter: GradientNoiseMeter | None = None
        self.saved: dict | None = None  # state from a checkpoint, applied once the optimizer exists

    def state(self) -> dict:
        saved = dict(self.saved or {})
        if self.meter is not None:
            saved["meter"] = self.meter.state_dict()
        if self.controller is not None:
            saved["p"] = self.controller.state_dict()
        return {"args": {"spec": self.spec, "every": self.every, "measure_noise": self.measure_noise,
                         "noise_every": self.noise_every},
                "attributes": {"saved": saved}}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        optimizer = inner_optimizer(optimizer)
        saved = self.saved or _saved_state(state, type(self).__name__)
        if self.measure_noise and self.meter is None:
            self.meter = GradientNoiseMeter(optimizer.param_groups, args.per_device_train_batch_size)
            if "meter" in saved:
                self.meter.load_state_dict(saved["meter"])
        if self.controller is not None:
            warmup = args.get_warmup_steps(state.max_steps)
            decay = decay_start_of(args.lr_scheduler_type, args.lr_scheduler_kwargs, warmup, state.max_steps)
            self.controller.bind(optimizer, RunShape(state.max_steps, decay), self.meter)
            if "p" in saved:
                self.controller.load_state_dict(saved["p"])
        self.saved = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.meter is not None:  # called once per optimizer step, before its first micro-batch
            if state.global_step % self.noise_every == 0:
                self.meter.start()
            else:
                self.meter.stop()
        if self.controller is not None:
            self.controller.apply(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.measure()  # no-op when GradPowerTrainer already measured before clipping

    def on_train_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.stop()

    def log_values(self, optimizer) -> dict[str, float]:
        """The noise EMAs, Adam's SNR and the p in force (numel-weighted mean, and per group if they differ)."""
        optimizer = inner_optimizer(optimizer)
        out: dict[str, float] = {}
        if self.meter is not None and self.meter.steps:
            stats = self.meter.stats()
            out.update({f"noise/{k}": stats[k] for k in ("b_simple", "grad_sq", "trace_cov")})
            out.update({f"noise/{k}": v for k, v in adam_snr(optimizer).items()})
        groups = [g for g in optimizer.param_groups if g.get(GROUP_KEY) is not None]
        if groups:
            sizes = [sum(p.numel() for p in g["params"]) for g in groups]
            out["gradpower_p"] = sum(g[GROUP_KEY] * n for g, n in zip(groups, sizes, strict=True)) / sum(sizes)
            if len({g[GROUP_KEY] for g in groups}) > 1:
                for i, g in enumerate(optimizer.param_groups):
                    if g.get(GROUP_KEY) is not None:
                        out[f"gradpower_p/{i}_{g.get('role', 'group')}"] = g[GROUP_KEY]
        return out


def _saved_state(state, name: str) -> dict:
    """Our state in a resumed ``TrainerState`` (Trainer restores callbacks only with an opt-in flag)."""
    data = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    data = data[0] if isinstance(data, list) and data else data
    return dict(((data or {}).get("attributes") or {}).get("saved") or {})


def check_process_count(args: TrainingArguments) -> None:
    """Refuse a multi-process launch that Trainer would run as independent single-process copies.

    On a machine without GPUs, ``accelerate launch --multi_gpu`` (or torchrun) starts N processes, but
    ``TrainingArguments`` without ``use_cpu`` does not join them: each trains its own model on all the
    data and they overwrite each other's ``output_dir``. Nothing fails, so say it before training.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but Trainer sees one: each would train "
            "an independent copy. Without GPUs, pass use_cpu=True (--use_cpu) so the processes train together."
        )


def optimizer_kwargs_from_args(args: TrainingArguments, base: str) -> dict:
    """Base-optimizer kwargs from ``TrainingArguments`` (betas/eps for Adam-like, then ``optim_args``)."""
    kwargs: dict = {}
    if base in _ADAM_LIKE:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    for item in filter(None, (args.optim_args or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optim_args must look like 'key=value,key=value', got {args.optim_args!r}")
        kwargs[key] = _literal(value)
    return kwargs


def optimizer_cls_and_kwargs(name: str, args: TrainingArguments, p: float = DEFAULT_POWER):
    """For a plain ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adampower", args))``.

    Trainer calls the returned factory with the model, so the grouping is this package's (Trainer's
    decay names; Muon routing) and phi runs after clipping, in the optimizer's step pre-hook.
    """
    base, _ = resolve_name(name)
    p = validate_power(p)

    def factory():
        def build(model, **kwargs):
            decay = Trainer.get_decay_parameter_names(None, model)
            return build_optimizer(model, name, p=p, decay_parameter_names=decay, **kwargs)

        return build

    kwargs = dict(lr=args.learning_rate, weight_decay=args.weight_decay, **optimizer_kwargs_from_args(args, base))
    return factory, kwargs


def _literal(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)
