"""Pre-train a named LLaMA / Qwen2MoE config with a paper recipe: the logic behind ``run_pretrain.py``.

Arguments come in three layers, later ones winning: the recipe's defaults (Appendix A), an optional
YAML/JSON file given as the first argument, then command-line flags (``run_args``). Every input is
checked (model config, recipe, schedule, optimizer name, data source, batch arithmetic, sequence length,
output folder, the checkpoint to resume from) before a model is built or data is read; ``main`` prints
each such problem as one ``run_pretrain.py: error: ...`` line (``HF_GRADPOWER_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from datasets.exceptions import DatasetGenerationError
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments, set_seed

from hf_gradpower import data as gp_data
from hf_gradpower.checkpoints import make_writable, resolve_resume
from hf_gradpower.model_card import RUN_INFO_FILE, write_model_card
from hf_gradpower.optimizers import is_power_optimizer
from hf_gradpower.run_args import DataArguments, ModelArguments, parse_args
from hf_gradpower.trainer import GradPowerTrainer, is_gradpower_optim

logger = logging.getLogger("hf_gradpower.pretrain")

PROG = "run_pretrain.py"
DEBUG_ENV = "HF_GRADPOWER_DEBUG"

__all__ = ["InputError", "Plan", "main", "parse_args", "prepare", "run", "train"]


class InputError(ValueError):
    """A problem with what the user asked for (arguments, files, folders), found before or while reading data."""


@dataclass
class Plan:
    """Everything a run needs, checked: parsed arguments, the resolved data source, the checkpoint to resume."""

    model_args: ModelArguments
    data_args: DataArguments
    args: TrainingArguments
    facts: dict
    source: gp_data.DataSource
    resume: str | None


class _RunTrainer(GradPowerTrainer):
    def create_model_card(self, *args, **kwargs):
        """Keep the run's own card (``model_card.write_model_card``, written before the push)."""
        if (Path(self.args.output_dir) / RUN_INFO_FILE).exists():
            return None
        return super().create_model_card(*args, **kwargs)


def prepare(argv: list[str] | None = None) -> Plan:
    """Parse and check everything; creates only the output folder (proving it writable). Raises ``InputError``."""
    try:
        model_args, data_args, args, facts = parse_args(argv)
        source = gp_data.validate_data_source(facts["dataset"])
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        make_writable(args.output_dir, overwrite=facts["overwrite_output_dir"] and resume is None,
                      main_process=int(os.environ.get("RANK", "0") or 0) == 0)
    except (ValueError, OSError) as exc:
        raise InputError(" ".join(str(exc).split())) from exc
    return Plan(model_args, data_args, args, facts, source, resume)


def _datasets(plan: Plan, tokenizer):
    args, data_args = plan.args, plan.data_args
    try:
        with args.main_process_first(desc="tokenise and pack"):
            train_ds, eval_ds = gp_data.build_datasets(
                plan.source, tokenizer, plan.facts["seq_len"], eval_docs=data_args.eval_docs, seed=args.seed,
                streaming=data_args.streaming,
            )
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc
        raise InputError(f"cannot read data source {plan.source.name!r}: {' '.join(str(cause).split())}") from exc
    if eval_ds is not None and hasattr(eval_ds, "select") and len(eval_ds) > data_args.max_eval_blocks:
        eval_ds = eval_ds.select(range(data_args.max_eval_blocks))
    elif eval_ds is not None and not hasattr(eval_ds, "select"):
        eval_ds = eval_ds.take(data_args.max_eval_blocks)
    return train_ds, eval_ds


def train(plan: Plan, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Build data and model, train (resuming if asked), save weights + card. Returns the output folder."""
    args, facts = plan.args, plan.facts
    set_seed(args.seed)
    tokenizer = gp_data.load_tokenizer(facts["tokenizer"])
    config = facts["config"]
    if len(tokenizer) > config.vocab_size:
        logger.warning("tokenizer has %d tokens, model vocab %d: ids >= %d would fail (pass --vocab_size)",
                       len(tokenizer), config.vocab_size, config.vocab_size)
    if getattr(config, "eos_token_id", None) is None:
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    train_ds, eval_ds = _datasets(plan, tokenizer)

    model = AutoModelForCausalLM.from_config(config)
    logger.info("model %s: %s parameters", facts["model_config"], f"{facts['parameters']:,}")
    trainer = _RunTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=plan.resume)
    step = trainer.state.global_step
    if eval_ds is not None and not any(r.get("step") == step and "eval_loss" in r for r in trainer.state.log_history):
        trainer.evaluate()  # the final model's eval loss, unless the last step already logged it
    trainer.save_model()
    optim = str(args.optim)
    if trainer.is_world_process_zero():
        power = is_gradpower_optim(optim) and is_power_optimizer(optim)
        run_info = {
            **{k: v for k, v in facts.items() if k not in ("config", "overwrite_output_dir")},
            "architecture": config.architectures[0] if config.architectures else type(model).__name__,
            "optim": optim, "gradpower_p": args.gradpower_p if power else None,
            "gradpower_order": args.gradpower_order, "learning_rate": args.learning_rate,
            "max_steps": args.max_steps, "tokens": step * facts["global_batch"] * facts["seq_len"],
            "resumed_from": plan.resume,
        }
        write_model_card(args.output_dir, run_info, trainer.state.log_history)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{optim} pre-training run")
    if trainer.is_world_process_zero():
        print(summary(args.output_dir, step), flush=True)
    return Path(args.output_dir)


def summary(output_dir: str, step: int) -> str:
    """Where a finished run put everything, one line per kind of output."""
    out = Path(output_dir)
    ckpts = sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[-1]))
    return "\n".join([
        f"{PROG}: finished at step {step}; everything is in {out}/:",
        "  weights, config, tokenizer: model.safetensors, config.json, tokenizer.json",
        f"  model card: README.md; run facts: {RUN_INFO_FILE}",
        "  metrics: metrics.json, metrics.csv, loss_curve.png",
        f"  checkpoints: {', '.join(ckpts) or 'none'} (continue with --resume_from_checkpoint latest)",
    ])


def run(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Parse, check, build data and model, train (resuming if asked), save weights + card. Returns output dir.

    ``callbacks`` are added to the Trainer, so tools (e.g. ``benchmarks.throughput``'s step timer) can
    observe the training loop of exactly this code path. Bad input raises ``InputError`` before any work.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(prepare(argv), callbacks)


def main(argv: list[str] | None = None) -> int:
    """``run_pretrain.py``: exit status 0, or 2 with one ``run_pretrain.py: error: ...`` line for bad input."""
    try:
        run(argv)
    except InputError as exc:
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
