"""The paper's pre-training recipes (Appendix A) as data, plus the arithmetic that derives a run from one.

A recipe fixes dataset, tokenizer, sequence length, global batch, warm-up and length; the AdamW
baseline (beta1 0.9, beta2 0.95, weight decay 0.1, clip 1.0, lr_min = 0.1 lr_max) is shared. The
peak learning rate comes from the model config's ``_gradpower.lr_max`` (Tables 1-2) unless given.
Schedules are transformers' own (``cosine_with_min_lr`` and ``warmup_stable_decay``); this module
only computes their arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cos", "wsd")
WSD_STABLE_FRACTION = 0.8  # constant lr until 80% of the steps, then linear decay (paper, Sec. 3.1)


@dataclass(frozen=True)
class Recipe:
    """One row of Appendix A; ``max_steps=None`` means ``tokens_per_param`` x parameters."""

    name: str
    dataset: str
    tokenizer: str
    seq_len: int
    global_batch: int
    warmup_steps: int
    max_steps: int | None = None
    tokens_per_param: float | None = None
    model_config: str = "llama-tiny"
    lr_max: float | None = None  # None: the model config's paper lr_max
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    lr_min_ratio: float = 0.1
    eval_steps: int = 500
    save_steps: int = 1000
    max_per_device_batch: int = 32  # default per-device batch: the largest divisor of the per-process share up to this


RECIPES: dict[str, Recipe] = {
    # C4 (GaLore / Wortsman setup): seq 256, batch 512, 1000 warm-up steps, ~20 tokens per parameter.
    "c4": Recipe("c4", dataset="c4", tokenizer="google-t5/t5-base", seq_len=256, global_batch=512,
                 warmup_steps=1000, tokens_per_param=20.0, model_config="llama-0.2b"),
    # OpenWebText (nanoGPT setup): seq 1024, batch 480, 50k steps (100k for the long runs), GPT-2 tokenizer.
    "openwebtext": Recipe("openwebtext", dataset="openwebtext", tokenizer="openai-community/gpt2", seq_len=1024,
                          global_batch=480, warmup_steps=1000, max_steps=50_000, model_config="llama-0.25b-owt"),
    # Minutes on a laptop CPU: tiny LLaMA on the embedded C4 sample with the embedded 4k tokenizer.
    "tiny": Recipe("tiny", dataset="embedded", tokenizer="embedded", seq_len=128, global_batch=16,
                   warmup_steps=20, max_steps=300, lr_max=2e-3, eval_steps=50, save_steps=100, max_per_device_batch=16),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def steps_for_tokens(n_params: int, tokens_per_param: float, global_batch: int, seq_len: int) -> int:
    """Chinchilla-style length: ``tokens_per_param * n_params`` tokens at ``global_batch * seq_len`` a step."""
    return math.ceil(tokens_per_param * n_params / (global_batch * seq_len))


def default_per_device_batch(global_batch: int, num_processes: int, cap: int) -> int:
    """The largest per-device batch <= ``cap`` that divides each process's share of ``global_batch``.

    So the default always splits: 16 sequences over 2 processes -> 8 each (no accumulation); the C4
    recipe's 512 over 8 GPUs -> 32 each with accumulation 2; OpenWebText's 480 over 8 -> 30, accumulation 2.
    """
    if global_batch % num_processes:
        raise ValueError(f"global batch {global_batch} does not split over {num_processes} processes; pass a "
                         f"--global_batch_size that is a multiple of {num_processes}")
    share = global_batch // num_processes
    return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)


def gradient_accumulation_steps(global_batch: int, per_device_batch: int, num_processes: int) -> int:
    """Accumulation that keeps ``global_batch = per_device_batch * processes * accumulation``."""
    per_step = per_device_batch * num_processes
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of per-device batch {per_device_batch} x "
            f"{num_processes} processes = {per_step}; change --per_device_train_batch_size or --global_batch_size."
        )
    return global_batch // per_step


def schedule_arguments(schedule: str, max_steps: int, warmup_steps: int, lr_min_ratio: float = 0.1) -> dict:
    """``lr_scheduler_type`` and ``lr_scheduler_kwargs`` for transformers' scheduler of that name.

    ``cos``: linear warm-up, cosine to ``lr_min_ratio * lr_max``. ``wsd``: linear warm-up, constant
    until 80% of the steps, linear decay reaching ``lr_min_ratio * lr_max`` at the last step
    (explicit stable/decay lengths: transformers' default would reach it one step after the end).
    """
    if not 0 <= warmup_steps < max_steps:
        raise ValueError(f"warm-up ({warmup_steps} steps) must be shorter than the run ({max_steps} steps)")
    if schedule == "cos":
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": lr_min_ratio}}
    if schedule == "wsd":
        stable_end = max(warmup_steps, int(WSD_STABLE_FRACTION * max_steps))
        kwargs = {
            "num_stable_steps": stable_end - warmup_steps,
            "num_decay_steps": max(1, max_steps - 1 - stable_end),
            "decay_type": "linear",
            "min_lr_ratio": lr_min_ratio,
        }
        return {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": kwargs}
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
