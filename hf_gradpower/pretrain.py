"""Pre-train a LLaMA / Qwen2MoE from ``configs/models`` with a paper recipe: the logic behind ``run_pretrain.py``.

Arguments come in three layers, later ones winning: the recipe's defaults (Appendix A), an optional
YAML/JSON file given as the first argument, then command-line flags. Every ``TrainingArguments``
option passes through. Inputs are checked (model config, recipe, schedule, data source, batch
arithmetic, sequence length) before a model is built or data is read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainerCallback, set_seed

from hf_gradpower import data as gp_data
from hf_gradpower.model_card import write_model_card
from hf_gradpower.model_configs import count_parameters, load_model_config, validate_model_config
from hf_gradpower.recipes import (
    SCHEDULES,
    get_recipe,
    gradient_accumulation_steps,
    schedule_arguments,
    steps_for_tokens,
)
from hf_gradpower.trainer import GradPowerTrainer, GradPowerTrainingArguments, last_complete_checkpoint

logger = logging.getLogger("hf_gradpower.pretrain")


@dataclass
class ModelArguments:
    recipe: str = field(default="tiny", metadata={"help": "Paper recipe: c4, openwebtext or tiny (CPU)."})
    model_config: str | None = field(
        default=None, metadata={"help": "A name in configs/models (e.g. llama-66m, qwen2moe-0.5b) or a JSON path."}
    )
    schedule: str = field(default="cos", metadata={"help": "cos or wsd.", "choices": list(SCHEDULES)})
    vocab_size: int | None = field(default=None, metadata={"help": "Override the config's vocabulary size."})


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None, metadata={"help": "embedded, c4, openwebtext, or local .txt/.jsonl/.parquet file/dir/glob."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "embedded, gpt2-embedded, or a hub/local name."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per sequence (recipe default)."})
    global_batch_size: int | None = field(default=None, metadata={"help": "Sequences per optimizer step."})
    eval_docs: int | None = field(default=None, metadata={"help": "Documents held out for evaluation."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the dataset (default: hub sets)."})
    max_eval_blocks: int = field(default=200, metadata={"help": "Cap on evaluation sequences."})


# Keys whose final value the recipe arithmetic needs before the full parse.
_PRE_KEYS = ("recipe", "model_config", "schedule", "max_steps", "warmup_steps", "global_batch_size",
             "per_device_train_batch_size", "optim", "output_dir", "learning_rate", "seq_len", "bf16", "fp16",
             "use_cpu", "vocab_size")


def _file_to_cli(path: str) -> list[str]:
    text = Path(path).read_text()
    values = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    return _to_cli(values)


def _to_cli(values: dict) -> list[str]:
    cli: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)) and key != "report_to":
            value = json.dumps(value)
        if isinstance(value, list):
            cli += [f"--{key}", *map(str, value)]
        else:
            cli += [f"--{key}", str(value)]
    return cli


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, GradPowerTrainingArguments, run facts) from recipe, file and flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    user = _file_to_cli(argv.pop(0)) + argv if argv and argv[0].endswith((".yaml", ".yml", ".json")) else argv
    pre = argparse.ArgumentParser(add_help=False)
    for key in _PRE_KEYS:
        pre.add_argument(f"--{key}")
    known, _ = pre.parse_known_args(user)

    recipe = get_recipe(known.recipe or "tiny")
    schedule = known.schedule or "cos"
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    config_name = known.model_config or recipe.model_config
    config = load_model_config(config_name, **({"vocab_size": int(known.vocab_size)} if known.vocab_size else {}))
    seq_len = int(known.seq_len or recipe.seq_len)
    validate_model_config(config, seq_len=seq_len)
    global_batch = int(known.global_batch_size or recipe.global_batch)
    per_device = int(known.per_device_train_batch_size or min(global_batch, 16 if recipe.name == "tiny" else 32))
    accumulation = gradient_accumulation_steps(global_batch, per_device, _world_size())
    n_params = count_parameters(config)["total"]
    max_steps = int(known.max_steps or recipe.max_steps or steps_for_tokens(
        n_params, recipe.tokens_per_param, global_batch, seq_len))
    warmup = int(known.warmup_steps or min(recipe.warmup_steps, max_steps // 10))
    lr = float(known.learning_rate or recipe.lr_max or config._gradpower["lr_max"])
    optim = known.optim or "adampower"
    on_gpu = torch.cuda.is_available() and known.use_cpu not in ("true", "True", "1")
    defaults = {
        "output_dir": f"outputs/{Path(config_name).stem}-{optim}-{schedule}",
        "optim": optim,
        "learning_rate": lr,
        "max_steps": max_steps,
        "warmup_steps": warmup,
        "per_device_train_batch_size": per_device,
        "per_device_eval_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "adam_beta1": recipe.adam_beta1,
        "adam_beta2": recipe.adam_beta2,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        **schedule_arguments(schedule, max_steps, warmup, recipe.lr_min_ratio),
        "eval_strategy": "steps",
        "eval_steps": min(recipe.eval_steps, max_steps),
        "save_steps": min(recipe.save_steps, max_steps),
        "save_total_limit": 3,
        "logging_steps": max(1, min(10, max_steps // 20)),
        "report_to": "none",
        "seed": 0,
        "dataloader_drop_last": True,
    }
    if on_gpu and known.bf16 is None and known.fp16 is None and torch.cuda.is_bf16_supported():
        defaults["bf16"] = True
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True  # also what makes `accelerate launch` start gloo processes on a CPU box
    parser = HfArgumentParser((ModelArguments, DataArguments, GradPowerTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=_to_cli(defaults) + user)
    facts = {
        "recipe": recipe.name, "model_config": config_name, "schedule": schedule, "seq_len": seq_len,
        "global_batch": global_batch, "parameters": n_params,
        "dataset": data_args.dataset or recipe.dataset, "tokenizer": data_args.tokenizer or recipe.tokenizer,
        "config": config,
    }
    return model_args, data_args, training_args, facts


def run(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Parse, check, build data and model, train (resuming if asked), save weights + card. Returns output dir.

    ``callbacks`` are added to the Trainer, so tools (e.g. ``benchmarks.throughput``'s step timer) can
    observe the training loop of exactly this code path.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, args, facts = parse_args(argv)
    gp_data.validate_data_source(facts["dataset"])
    set_seed(args.seed)
    tokenizer = gp_data.load_tokenizer(facts["tokenizer"])
    config = facts["config"]
    if len(tokenizer) > config.vocab_size:
        logger.warning("tokenizer has %d tokens, model vocab %d: ids >= %d would fail (pass --vocab_size)",
                       len(tokenizer), config.vocab_size, config.vocab_size)
    if getattr(config, "eos_token_id", None) is None:
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    with args.main_process_first(desc="tokenise and pack"):
        train_ds, eval_ds = gp_data.build_datasets(
            facts["dataset"], tokenizer, facts["seq_len"], eval_docs=data_args.eval_docs, seed=args.seed,
            streaming=data_args.streaming,
        )
    if eval_ds is not None and hasattr(eval_ds, "select") and len(eval_ds) > data_args.max_eval_blocks:
        eval_ds = eval_ds.select(range(data_args.max_eval_blocks))
    elif eval_ds is not None and not hasattr(eval_ds, "select"):
        eval_ds = eval_ds.take(data_args.max_eval_blocks)

    model = AutoModelForCausalLM.from_config(config)
    logger.info("model %s: %s parameters", facts["model_config"], f"{facts['parameters']:,}")
    trainer = GradPowerTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=tokenizer, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=_checkpoint_to_resume(args))
    step = trainer.state.global_step
    if eval_ds is not None and not any(r.get("step") == step and "eval_loss" in r for r in trainer.state.log_history):
        trainer.evaluate()  # the final model's eval loss, unless the last step already logged it
    trainer.save_model()
    if trainer.is_world_process_zero():
        run_info = {
            **{k: v for k, v in facts.items() if k != "config"},
            "architecture": config.architectures[0] if config.architectures else type(model).__name__,
            "optim": str(args.optim), "gradpower_p": args.gradpower_p if str(args.optim).endswith("power") else None,
            "gradpower_order": args.gradpower_order, "learning_rate": args.learning_rate,
            "max_steps": args.max_steps, "tokens": trainer.state.global_step * facts["global_batch"] * facts["seq_len"],
        }
        write_model_card(args.output_dir, run_info, trainer.state.log_history)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message=f"{args.optim} pre-training run")
    return Path(args.output_dir)


def _checkpoint_to_resume(args) -> str | None:
    """``--resume_from_checkpoint latest|true`` -> newest checkpoint in output_dir; a path -> itself."""
    resume = args.resume_from_checkpoint
    if resume is None or resume.lower() not in ("latest", "true"):
        return resume
    last = last_complete_checkpoint(args.output_dir)
    if last is None:
        raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {args.output_dir}")
    return last
