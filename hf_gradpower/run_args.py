"""``run_pretrain.py``'s arguments: one HfArgumentParser pass over flags (after an optional YAML/JSON file),
then the paper recipe fills every value the user did not give.

Every ``TrainingArguments`` option works as in the transformers example scripts: bare booleans
(``--bf16``), ``--flag true/false``, and config files whose booleans, lists and dicts keep their types.
The values a recipe fills default to None in the parser, so "not given" is visible after the one parse;
the dataclasses are then built once, from the final values. Everything here is checked before any model
or data work (``ValueError``, one line, with the fix).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool
from transformers.training_args import OptimizerNames

from hf_gradpower.checkpoints import choose_output_dir
from hf_gradpower.model_configs import count_parameters, load_model_config, validate_model_config
from hf_gradpower.optimizers import available_optimizers
from hf_gradpower.recipes import (
    SCHEDULES,
    default_per_device_batch,
    get_recipe,
    gradient_accumulation_steps,
    schedule_arguments,
    steps_for_tokens,
)
from hf_gradpower.trainer import GradPowerTrainingArguments, is_gradpower_optim

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    recipe: str = field(default="tiny", metadata={"help": "Paper recipe: c4, openwebtext or tiny (CPU)."})
    model_config: str | None = field(
        default=None, metadata={"help": "A named config (e.g. llama-66m, qwen2moe-0.5b) or a JSON path."}
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


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run in --output_dir (its checkpoints are removed first)."},
    )


DATACLASSES = (ModelArguments, DataArguments, OutputArguments, GradPowerTrainingArguments)
# TrainingArguments the recipe fills when the user leaves them out (their parser default becomes None).
RECIPE_FILLED = ("output_dir", "learning_rate", "max_steps", "warmup_steps", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps", "adam_beta1", "adam_beta2",
                 "weight_decay", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "eval_strategy",
                 "eval_steps", "save_steps", "save_total_limit", "logging_steps", "report_to", "seed",
                 "dataloader_drop_last", "bf16", "fp16", "use_cpu")
# Counts that must be positive when given (0 or less would divide by zero or train nothing).
POSITIVE = ("seq_len", "global_batch_size", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "max_steps", "max_eval_blocks", "vocab_size", "eval_steps",
            "save_steps", "logging_steps")


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are ``ValueError`` (one line for the caller to print, no usage dump)."""

    def error(self, message):
        raise ValueError(message)


def build_parser() -> HfArgumentParser:
    parser = _Parser(DATACLASSES, prog="run_pretrain.py")
    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:  # `bool | None` fields: accept them bare too
            action.nargs, action.const = "?", True
    parser.set_defaults(**dict.fromkeys(RECIPE_FILLED))
    return parser


def read_config_file(path: str) -> dict:
    """The mapping in a YAML/JSON config file, or a one-line ``ValueError`` saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} not found; give an existing .yaml/.json file (or flags only)")
    try:
        text = p.read_text(encoding="utf-8")
        values = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text; give a YAML/JSON file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path} is not valid JSON ({exc.msg}, line {exc.lineno}); fix the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"config file {path} is not valid YAML ({getattr(exc, 'problem', None) or exc}{where}); "
                         "fix the file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values")
    return values


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def read_arguments(argv: list[str] | None = None) -> dict:
    """The one parse: ``{argument: value}`` from an optional config file (first) and flags (winning);
    None where neither gives a value the recipe fills."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        path = argv.pop(0)
        values = read_config_file(path)
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"config file {path}: unknown argument(s) {', '.join(unknown)}; see --help")
        parser.set_defaults(**values)
    return vars(parser.parse_args(argv))


def check_optimizer_name(name: str) -> None:
    """Unknown ``--optim``: one line listing this package's names and transformers'."""
    theirs = [o.value for o in OptimizerNames]
    if is_gradpower_optim(name) or name in theirs:
        return
    close = difflib.get_close_matches(name, [*available_optimizers(), *theirs], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"unknown --optim {name!r}{hint}; this package's: {', '.join(available_optimizers())}; "
                     f"transformers': {', '.join(theirs)}")


_HYPER_RANGES = (
    ("learning_rate", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
)


def _check_positive(values: dict) -> None:
    for key in POSITIVE:
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or v <= 0):
            raise ValueError(f"--{key} must be a positive integer, got {v}")
    for key in ("eval_docs", "warmup_steps"):
        if values.get(key) is not None and values[key] < 0:
            raise ValueError(f"--{key} must be >= 0, got {values[key]}")
    for key, valid, need in _HYPER_RANGES:  # torch would refuse these only after the model is built
        v = values.get(key)
        if v is not None and not (math.isfinite(v) and valid(v)):
            raise ValueError(f"--{key} must be {need}, got {v}")


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, GradPowerTrainingArguments, run facts) from recipe, file and flags.

    Read-only: checks the output folder (``checkpoints.choose_output_dir``) but creates nothing.
    """
    v = read_arguments(argv)
    _check_positive(v)
    check_optimizer_name(str(v["optim"]))
    recipe = get_recipe(v["recipe"])
    schedule = v["schedule"]
    config_name = v["model_config"] or recipe.model_config
    config = load_model_config(config_name, **({"vocab_size": v["vocab_size"]} if v["vocab_size"] else {}))
    seq_len = v["seq_len"] or recipe.seq_len
    validate_model_config(config, seq_len=seq_len)
    world = _world_size()
    global_batch = v["global_batch_size"] or recipe.global_batch
    per_device = v["per_device_train_batch_size"] or default_per_device_batch(
        global_batch, world, recipe.max_per_device_batch)
    accumulation = v["gradient_accumulation_steps"] or gradient_accumulation_steps(global_batch, per_device, world)
    if per_device * world * accumulation != global_batch:
        raise ValueError(f"per-device batch {per_device} x {world} processes x {accumulation} accumulation steps "
                         f"is not the global batch {global_batch}; drop --gradient_accumulation_steps (it is derived)")
    n_params = count_parameters(config)["total"]
    max_steps = int(v["max_steps"] or recipe.max_steps or steps_for_tokens(
        n_params, recipe.tokens_per_param, global_batch, seq_len))
    warmup = v["warmup_steps"] if v["warmup_steps"] is not None else min(recipe.warmup_steps, max_steps // 10)
    warmup = int(warmup) if warmup >= 1 else round(warmup * max_steps)  # below 1: a fraction, as in transformers
    lr = v["learning_rate"] if v["learning_rate"] is not None else (
        recipe.lr_max or getattr(config, "_gradpower", {}).get("lr_max"))
    if lr is None:
        raise ValueError(f"model config {config_name} has no _gradpower.lr_max; pass --learning_rate")
    use_cpu = v["use_cpu"] if v["use_cpu"] is not None else not torch.cuda.is_available()
    on_gpu = torch.cuda.is_available() and not use_cpu
    default_dir = f"outputs/{Path(config_name).stem}-{v['optim']}-{schedule}"
    resuming = str(v["resume_from_checkpoint"] or "false").lower() != "false"
    filled = {
        "output_dir": default_dir,
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
        "bf16": on_gpu and not v["fp16"] and torch.cuda.is_bf16_supported(),
        "fp16": False,
        "use_cpu": use_cpu,  # on a CPU box also what makes `accelerate launch` start gloo processes
    }
    named_dir = v["output_dir"] is not None
    v.update({k: value for k, value in filled.items() if v[k] is None})
    v["output_dir"] = choose_output_dir(v["output_dir"], resuming=resuming, overwrite=v["overwrite_output_dir"],
                                        rename=not named_dir)
    model_args, data_args, output_args, training_args = (
        dtype(**{f.name: v[f.name] for f in fields(dtype) if f.init}) for dtype in DATACLASSES
    )
    facts = {
        "recipe": recipe.name, "model_config": config_name, "schedule": schedule, "seq_len": seq_len,
        "global_batch": global_batch, "parameters": n_params,
        "dataset": data_args.dataset or recipe.dataset, "tokenizer": data_args.tokenizer or recipe.tokenizer,
        "config": config, "overwrite_output_dir": output_args.overwrite_output_dir,
    }
    return model_args, data_args, training_args, facts
