"""GradPower in ``transformers.Trainer``: the only Trainer-aware module of the package.

``GradPowerTrainer`` differs from ``Trainer`` in ``create_optimizer`` (our optimizers by name, with
Trainer's weight-decay grouping and ``adam_beta1/2``, ``adam_epsilon``, ``optim_args``) and in where
phi runs relative to gradient clipping. Everything else — schedulers, gradient accumulation,
bf16/fp16, checkpointing and resume, logging — is Trainer's own.

Order (``gradpower_order``):
  * ``"before_clip"`` (default, the paper's Algorithm 1: clip(phi(g))): phi runs inside
    ``_clip_grad_norm``, before Trainer clips; under fp16 the gradients still carry the loss scale
    there, so they are transformed as ``s * phi(g / s)``. The logged ``grad_norm`` is that of phi(g).
  * ``"after_clip"`` (phi(clip(g))): phi runs in the optimizer's step pre-hook; ``grad_norm`` is
    that of g. This is also what a plain ``Trainer`` with :func:`optimizer_cls_and_kwargs` does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from hf_gradpower.attach import apply_now
from hf_gradpower.checkpoints import resolve_resume
from hf_gradpower.optimizers import available_optimizers, build_optimizer, resolve_name
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
    gradpower_p: float = field(
        default=DEFAULT_POWER, metadata={"help": "GradPower exponent p (used by the *power optimizers)."}
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
        self.gradpower_p = validate_power(self.gradpower_p)
        if self.gradpower_order not in ORDERS:
            raise ValueError(f"gradpower_order must be one of {ORDERS}, got {self.gradpower_order!r}")
        name = str(getattr(self.optim, "value", self.optim))
        if not is_gradpower_optim(name):
            super().__post_init__()
            return
        self.optim = "adamw_torch"  # a name TrainingArguments accepts, while it validates the rest
        super().__post_init__()
        self.optim = name.lower()


def is_gradpower_optim(name: str) -> bool:
    """True for the names this package builds (``adamw``, ``adampower``, ``muon``, ``sgdpower``...)."""
    try:
        resolve_name(name)
    except ValueError:
        return False
    return True


class GradPowerTrainer(Trainer):
    """``transformers.Trainer`` that builds AdamPower / MuonPower / any ``*power`` optimizer from ``args.optim``."""

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            check_process_count(training_args)
        super().__init__(*args, **kwargs)
        self._check_gradpower_setup()

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
        self.optimizer = build_optimizer(
            opt_model,
            self.args.optim,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            p=getattr(self.args, "gradpower_p", DEFAULT_POWER),
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
            blockwise_lr=getattr(self.args, "blockwise_lr", False),
            **optimizer_kwargs_from_args(self.args, base),
        )
        return self.optimizer

    def _clip_grad_norm(self, model):
        if getattr(self.args, "gradpower_order", "after_clip") == "before_clip":
            apply_now(self.optimizer, grad_scale=self._pending_loss_scale())
        return super()._clip_grad_norm(model)

    def _pending_loss_scale(self):
        """The fp16 loss scale the gradients still carry at clipping time, or None."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # a device tensor: no host sync


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
