"""run_pretrain's one parse: every boolean TrainingArguments flag, config files with typed values, recipe filling.

Parse only: nothing here trains.
"""

from __future__ import annotations

import typing
from dataclasses import fields

import pytest

from hf_gradpower.run_args import parse_args, read_arguments
from hf_gradpower.trainer import GradPowerTrainingArguments


def _boolean_fields() -> list[str]:
    hints = typing.get_type_hints(GradPowerTrainingArguments)
    return sorted(f.name for f in fields(GradPowerTrainingArguments)
                  if f.init and (hints[f.name] is bool or bool in typing.get_args(hints[f.name])))


BOOLEANS = _boolean_fields()


def test_the_boolean_fields_are_found():
    assert {"bf16", "use_cpu", "gradient_checkpointing", "push_to_hub", "blockwise_lr", "greater_is_better"} <= set(
        BOOLEANS)


@pytest.mark.parametrize("name", BOOLEANS)
def test_every_boolean_flag_parses_bare_true_and_false(name):
    assert read_arguments([f"--{name}"])[name] is True
    assert read_arguments([f"--{name}", "true"])[name] is True
    assert read_arguments([f"--{name}", "false"])[name] is False


def test_bare_booleans_reach_the_training_arguments(tmp_path):
    _, _, args, _ = parse_args(["--bf16", "--use_cpu", "--gradient_checkpointing", "--output_dir", str(tmp_path)])
    assert (args.bf16, args.use_cpu, args.gradient_checkpointing) == (True, True, True)
    _, _, args, _ = parse_args(["--bf16", "false", "--use_cpu", "false", "--gradient_checkpointing", "false",
                                "--output_dir", str(tmp_path)])
    assert (args.bf16, args.use_cpu, args.gradient_checkpointing) == (False, False, False)


YAML = """\
optim: adamw
schedule: wsd
bf16: true
gradient_checkpointing: true
use_cpu: true
learning_rate: 1e-3          # YAML reads this as a string; it is typed like the flag
report_to: [tensorboard]
lr_scheduler_kwargs: {min_lr_rate: 0.2}
max_steps: 40
dataloader_pin_memory: false
global_batch_size: 32
"""
FLAGS = ["--optim", "adamw", "--schedule", "wsd", "--bf16", "--gradient_checkpointing", "--use_cpu",
         "--learning_rate", "1e-3", "--report_to", "tensorboard", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.2}',
         "--max_steps", "40", "--no_dataloader_pin_memory", "--global_batch_size", "32"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_and_the_same_flags_give_the_same_arguments(tmp_path, suffix):
    import json

    import yaml

    cfg = tmp_path / f"run{suffix}"
    values = yaml.safe_load(YAML)
    cfg.write_text(YAML if suffix == ".yaml" else json.dumps(values))
    out = ["--output_dir", str(tmp_path / "out")]
    m1, d1, from_file, _ = parse_args([str(cfg), *out])
    m2, d2, from_flags, _ = parse_args(FLAGS + out)
    assert from_file.to_dict() == from_flags.to_dict()
    assert (m1, d1) == (m2, d2)
    assert (from_file.bf16, from_file.learning_rate, from_file.report_to) == (True, 1e-3, ["tensorboard"])
    assert from_file.lr_scheduler_kwargs == {"min_lr_rate": 0.2} and from_file.dataloader_pin_memory is False
    assert (m1.schedule, d1.global_batch_size, from_file.per_device_train_batch_size) == ("wsd", 32, 16)


def test_flags_after_the_file_win(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("bf16: true\nmax_steps: 40\n")
    _, _, args, _ = parse_args([str(cfg), "--bf16", "false", "--max_steps", "20", "--output_dir", str(tmp_path)])
    assert (args.bf16, args.max_steps) == (False, 20)


@pytest.mark.parametrize("text, match", [
    ('{"max_steps": 5, "optim": "adam', "not valid JSON"),
    ("max_steps: 5\noptim: [adamw\n", "not valid YAML"),
    ("- a list\n- not a mapping\n", "must hold a mapping"),
    ("max_stepz: 5\n", "unknown argument.*max_stepz"),
])
def test_broken_config_files_are_one_line(tmp_path, text, match):
    cfg = tmp_path / ("run.json" if text.startswith("{") else "run.yaml")
    cfg.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_arguments([str(cfg)])
    assert "\n" not in str(err.value)


def test_the_recipe_fills_only_what_was_not_given(tmp_path):
    _, _, args, _ = parse_args(["--output_dir", str(tmp_path)])
    assert (args.learning_rate, args.max_steps, args.warmup_steps, args.seed) == (2e-3, 300, 20, 0)
    _, _, args, _ = parse_args(["--output_dir", str(tmp_path), "--learning_rate", "5e-4", "--seed", "42",
                                "--warmup_steps", "0"])
    assert (args.learning_rate, args.seed, args.warmup_steps) == (5e-4, 42, 0)


def test_the_default_folder_of_a_finished_run_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished = tmp_path / "outputs" / "llama-tiny-adampower-cos"
    finished.mkdir(parents=True)
    (finished / "gradpower.json").write_text("{}")
    _, _, args, _ = parse_args([])
    assert args.output_dir == "outputs/llama-tiny-adampower-cos-2"
    with pytest.raises(ValueError, match="holds an earlier run.*--overwrite_output_dir.*--resume_from_checkpoint"):
        parse_args(["--output_dir", str(finished)])
    _, _, args, _ = parse_args(["--output_dir", str(finished), "--overwrite_output_dir"])
    assert args.output_dir == str(finished)
