"""Model configurations of the GradPower paper (arXiv 2505.24275, Appendix A, Tables 1-2).

The configurations are plain Hugging Face ``config.json`` files shipped inside the package
(``hf_gradpower/resources/model_configs/``, written by ``configs/make_model_configs.py``). They load with
``LlamaConfig.from_json_file`` / ``Qwen2MoeConfig.from_json_file`` / ``AutoConfig.from_pretrained(path)``
or with :func:`load_model_config` below. Each file carries two extra top-level keys, ``_comment`` and
``_gradpower`` (the paper row, the reading chosen, ``lr_max``, dataset, stated and computed parameter
counts). ``PretrainedConfig`` keeps unknown keys as plain attributes and writes them back on
``save_pretrained``, so they are harmless to ``transformers``.

They load by name from any install (editable or wheel); ``HF_GRADPOWER_MODEL_CONFIGS`` points the
names at another folder, and any path to a JSON file works too.

Readings of the paper's tables
------------------------------
Parameter counts below are ``count_parameters(config)["total"]`` (all parameters, embeddings and
``lm_head`` included, ``lm_head`` NOT tied to the input embedding), computed on the meta device.
The search over natural readings (vocab 32000/32100/50257/50304, tied/untied, with/without
embeddings, stated/swapped/doubled depth, attention width, ...) is ``configs/make_model_configs.py
--explore``.

LLaMA (Table 1; d_model, d_ff, n_head, depth). C4 rows: T5 tokenizer, vocab 32000 (GaLore setup);
OpenWebText row: GPT-2 tokenizer, vocab 50304. SwiGLU MLP with ``intermediate_size = d_ff``,
no biases, untied embeddings.

=============  =======================  ===========  ==========  =======
paper row      config used              computed     stated      error
=============  =======================  ===========  ==========  =======
66M            512, 2048, 8, 8          66.33M       66M         +0.50%
0.2B           **1024, 4096**, 16, 8    199.77M      200M        -0.11%
0.25B (OWT)    **1024, 4096**, 16, 8    237.26M      237M        +0.11%
0.4B           1280, 5120, 16, 12       396.52M      400M        -0.87%
1B             1600, 6400, 25, 22       1003.59M     1004M       -0.04%
2B             2048, 8096, 32, 28       1993.72M     1994M       -0.01%
=============  =======================  ===========  ==========  =======

* 0.2B and 0.25B: both rows print (768, 3072, 16, 8), which does not add up: 124.7M with vocab 32000
  (-38%) and 152.8M with vocab 50304 (-36%); no vocab / tying / embedding-scope variant fits.
  The rows print the same architecture and differ only in dataset, so the reading is ONE model
  whose size differs by vocabulary alone: d_model 1024, d_ff 4096 (= 4 d_model), 16 heads
  (head_dim 64), depth 8 as printed, untied. Only the d_model / d_ff cells change, and both stated
  sizes are hit (199.77M with vocab 32000, 237.26M with 50304). The same 1024/4096/16/8 model is
  the "0.25B" of the authors' companion code (Blockwise LR, Wang et al. 2025). Alternative that
  fits the 0.2B row only: 768/3072 with depth 16 (200.17M), but that is 228.3M (-3.7%) for 0.25B.
* 0.4B: the largest error (-0.87%); vocab 32100 (the T5 tokenizer's length with its 100 sentinel
  tokens) would give -0.80%. 32000 is kept for all C4 models (GaLore setup).
* 2B: d_ff 8096 (sic, not 8192) is kept; it reproduces the stated 1994M.

Qwen2MoE (Table 2; d_model, d_ff, n_head, depth, n_experts; 4 experts active per token, sliding
window off, C4 / T5 vocab 32000, untied embeddings, qkv bias as in Qwen2). The only reading that
fits both the total and the activated count: ``d_ff`` is the *shared expert* width
(``shared_expert_intermediate_size = d_ff``) and each routed expert is fine-grained with
``moe_intermediate_size = d_ff / 4`` (the Qwen1.5-MoE ratio). Check: total - activated =
depth * (n_experts - 4) * 3 * d_model * moe_intermediate_size gives moe_intermediate_size =
768.6 / 767.8 / 1023.8 for the three rows.

=====  ===================  =================  ===================  =================
row    total (computed)     stated / error     activated (comp.)    stated / error
=====  ===================  =================  ===================  =================
0.5B   502.34M              502M  / +0.07%     247.54M              247M / +0.22%
1B     1040.49M             1040M / +0.05%     297.32M              297M / +0.11%
2B     1945.21M             1945M / +0.01%     535.92M              536M / -0.01%
=====  ===================  =================  ===================  =================

The router load-balancing loss is on (``output_router_logits=True``, ``router_aux_loss_coef=0.001``).

Tiny configs (``llama-tiny``, ``qwen2moe-tiny``) are for the quick start, tests and benchmarks; their
``vocab_size`` (4096) matches the small BPE tokenizer the data pipeline trains/ships. Override with
``load_model_config("llama-tiny", vocab_size=len(tokenizer))``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

__all__ = [
    "MODEL_CONFIGS_DIR",
    "available_model_configs",
    "count_parameters",
    "get_num_experts",
    "load_model_config",
    "model_configs_dir",
    "validate_model_config",
]

#: The named configs, shipped inside the package.
MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "resources" / "model_configs"
_ENV_VAR = "HF_GRADPOWER_MODEL_CONFIGS"
#: Sizes, counts and depths that must be positive integers wherever a config has them.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
               "shared_expert_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok")


def model_configs_dir() -> Path:
    """The folder holding the named model configs (``$HF_GRADPOWER_MODEL_CONFIGS`` if set)."""
    env = os.environ.get(_ENV_VAR)
    return Path(env).expanduser() if env else MODEL_CONFIGS_DIR


def available_model_configs() -> list[str]:
    """Names accepted by :func:`load_model_config`, e.g. ``["llama-0.2b", ..., "qwen2moe-tiny"]``."""
    folder = model_configs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    folder = model_configs_dir()
    by_name = folder / f"{text}.json"
    if os.sep not in text and "/" not in text and by_name.is_file():
        return by_name
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    names = ", ".join(available_model_configs()) or f"none found in {folder}"
    raise ValueError(
        f"Unknown model config {text!r}: not a file and not one of the available names ({names}); "
        f"pass one of these names or a path to a config JSON."
    )


def load_model_config(name_or_path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
    """Load a model config by name (``available_model_configs()``) or from a JSON path.

    ``overrides`` replace keys of the JSON before the config is built, so derived fields follow
    (e.g. ``num_hidden_layers=2`` also shortens Qwen2MoE's ``layer_types``). The config class is
    picked from the file's ``model_type``.
    """
    path = _resolve(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"Model config {path} is not valid JSON ({exc}); fix the file.") from None
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"Model config {path} has model_type={model_type!r}, which transformers does not know; "
            f"set a valid 'model_type' (e.g. 'llama', 'qwen2_moe')."
        )
    config_class = CONFIG_MAPPING[model_type]
    if overrides:
        known = set(config_class().to_dict()) | set(data)
        unknown = sorted(k for k in overrides if k not in known)
        if unknown:
            warnings.warn(
                f"load_model_config({str(name_or_path)!r}): override(s) {unknown} are not fields of "
                f"{config_class.__name__}; they are stored as plain attributes.",
                stacklevel=2,
            )
        data.update(overrides)
        # Derived fields must be recomputed from the overridden values.
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            data.pop("layer_types", None)
        if {"hidden_size", "num_attention_heads"} & set(overrides) and "head_dim" not in overrides:
            data.pop("head_dim", None)
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError, StrictDataclassError) as exc:  # transformers 5 configs check field types
        reason = " ".join(str(exc).split())
        raise ValueError(f"Model config {path} is not a valid {config_class.__name__} ({reason}); fix the file.") from None


def get_num_experts(config: PretrainedConfig) -> tuple[int, int]:
    """``(num_experts, num_experts_per_tok)`` of an MoE config, ``(0, 0)`` for a dense one."""
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        n = getattr(config, attr, None)
        if n:
            return int(n), int(getattr(config, "num_experts_per_tok", 0) or 0)
    return 0, 0


def count_parameters(config: PretrainedConfig) -> dict[str, int]:
    """Count parameters by building the causal-LM model on the meta device (allocates nothing).

    Returns ``total`` (unique parameters, tied weights counted once), ``embedding`` (input embedding
    plus an untied ``lm_head``), ``non_embedding`` (= total - embedding) and ``activated``: for MoE
    models ``total - (num_experts - num_experts_per_tok) * per_expert`` summed over the layers' expert
    modules, where ``per_expert`` is read from the actual parameter shapes (fused 3-D
    ``[num_experts, ...]`` tensors in transformers 5, or one sub-module per expert); dense models:
    ``activated == total``.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())

    emb_ids: dict[int, torch.Tensor] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            emb_ids.update({id(p): p for p in module.parameters()})
    embedding = sum(p.numel() for p in emb_ids.values())

    inactive = 0
    n_experts, top_k = get_num_experts(config)
    if n_experts:
        for name, module in model.named_modules():
            if not name.endswith(".experts"):
                continue
            numel = sum(p.numel() for p in module.parameters())
            if numel % n_experts:
                raise ValueError(
                    f"{name} holds {numel} parameters, not a multiple of num_experts={n_experts}; "
                    f"count_parameters cannot split it per expert."
                )
            inactive += (n_experts - top_k) * (numel // n_experts)
    del model
    return {
        "total": total,
        "activated": total - inactive,
        "embedding": embedding,
        "non_embedding": total - embedding,
    }


def validate_model_config(config: PretrainedConfig, seq_len: int | None = None) -> None:
    """Raise ``ValueError`` (one line: the problem and the fix) for an unusable config.

    Checks: every size, count and depth the config has (``SIZE_FIELDS``) is a positive integer (a
    ``num_hidden_layers`` of -2 would otherwise build a 0-layer model that trains without error);
    ``seq_len <= max_position_embeddings``; ``hidden_size % num_attention_heads == 0``;
    ``num_attention_heads % num_key_value_heads == 0``; for MoE ``num_experts_per_tok <= num_experts``.
    """
    for name in SIZE_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"model config has {name}={value!r}; it must be a positive integer: fix the config JSON.")
    max_pos = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and max_pos is not None and seq_len > max_pos:
        raise ValueError(
            f"seq_len={seq_len} exceeds max_position_embeddings={max_pos}; lower seq_len or load the "
            f"config with max_position_embeddings={seq_len}."
        )
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if hidden and heads and hidden % heads:
        raise ValueError(
            f"hidden_size={hidden} is not divisible by num_attention_heads={heads}; choose a head count "
            f"that divides hidden_size."
        )
    kv_heads = getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}; choose "
            f"num_key_value_heads dividing num_attention_heads."
        )
    n_experts, top_k = get_num_experts(config)
    if n_experts and top_k > n_experts:
        raise ValueError(
            f"num_experts_per_tok={top_k} exceeds num_experts={n_experts}; set num_experts_per_tok "
            f"<= {n_experts} or add experts."
        )
