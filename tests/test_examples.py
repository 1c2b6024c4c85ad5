"""The examples run as a user runs them (tiny settings): a plain loop, GradPowerTrainer, TRL's SFTTrainer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gradpower import AdamPower, GradPowerMixin
from hf_gradpower.attach import GROUP_KEY, inner_optimizer
from hf_gradpower.data import load_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUIET = "--use_cpu --report_to none --save_strategy no --bf16 false"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory) -> str:
    """A tiny causal LM with the shipped tokenizer, saved like a Hub checkpoint (nothing is downloaded)."""
    folder = tmp_path_factory.mktemp("small_lm")
    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_plain_loop_trains_with_power_before_clipping():
    losses = _load("plain_loop").main(
        ["--steps", "8", "--seq_len", "32", "--batch_size", "4", "--lr", "3e-3"]
    )
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_finetune_trainer_example_trains_adampower(small_lm, tmp_path):
    out = tmp_path / "out"
    flags = "--seq_len 32 --max_steps 3 --per_device_train_batch_size 4 --learning_rate 3e-3"
    metrics = _load("finetune_trainer").main(
        ["--model_name_or_path", small_lm, "--output_dir", str(out), *f"{flags} {QUIET}".split()]
    )
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert (out / "model.safetensors").exists()


def test_trl_sft_example_runs_with_optim_adampower(small_lm, tmp_path):
    pytest.importorskip(
        "trl", reason="TRL is not installed (pip install trl): the SFTTrainer example is skipped"
    )
    example = _load("trl_sft")
    flags = (
        "--optim adampower --gradpower_p 1.1 --max_steps 2 --per_device_train_batch_size 2 --max_length 32"
    )
    trainer = example.main(
        ["--model_name_or_path", small_lm, "--output_dir", str(tmp_path / "sft"), *f"{flags} {QUIET}".split()]
    )
    optimizer = inner_optimizer(trainer.optimizer)
    assert isinstance(optimizer, AdamPower)  # not TRL's or Trainer's AdamW
    assert {g[GROUP_KEY] for g in optimizer.param_groups} == {1.1}
    assert trainer.state.global_step == 2


def test_mixin_after_the_trainer_class_is_refused():
    from transformers import Trainer

    with pytest.raises(TypeError, match="put GradPowerMixin first"):
        type("Wrong", (Trainer, GradPowerMixin), {})
