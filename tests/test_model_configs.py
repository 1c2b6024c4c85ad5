"""Model configs of the GradPower paper: parameter counts, loading, validation (CPU, meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

from hf_gradpower.model_configs import (
    MODEL_CONFIGS_DIR,
    available_model_configs,
    count_parameters,
    load_model_config,
    validate_model_config,
)

PAPER = {  # name: (stated total, stated activated or None, lr_max)
    "llama-66m": (66e6, None, 1e-3),
    "llama-0.2b": (200e6, None, 1e-3),
    "llama-0.25b-owt": (237e6, None, 8e-4),
    "llama-0.4b": (400e6, None, 6e-4),
    "llama-1b": (1004e6, None, 3e-4),
    "llama-2b": (1994e6, None, 2e-4),
    "qwen2moe-0.5b": (502e6, 247e6, 6e-4),
    "qwen2moe-1b": (1040e6, 297e6, 3e-4),
    "qwen2moe-2b": (1945e6, 536e6, 2e-4),
}
TINY = ["llama-tiny", "qwen2moe-tiny"]


def test_available_names():
    names = available_model_configs()
    assert set(PAPER) | set(TINY) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config_matches_table(name):
    total, activated, lr_max = PAPER[name]
    config = load_model_config(name)
    counts = count_parameters(config)
    assert abs(counts["total"] / total - 1) < 0.01, (name, counts)
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    if activated is None:
        assert counts["activated"] == counts["total"]
    else:
        assert abs(counts["activated"] / activated - 1) < 0.01, (name, counts)
        assert config.num_experts_per_tok == 4 and config.use_sliding_window is False
        assert config.output_router_logits is True and config.router_aux_loss_coef > 0
    meta = config._gradpower
    assert meta["lr_max"] == lr_max and meta["paper_params"] == int(total)
    assert meta["computed_params"] == counts  # the JSON documents what the model really has
    validate_model_config(config, seq_len=meta["seq_len"])


def test_paper_numbers_kept():
    assert load_model_config("llama-2b").intermediate_size == 8096  # sic in the paper
    one_b = load_model_config("llama-1b")
    assert one_b.hidden_size // one_b.num_attention_heads == 64
    assert load_model_config("llama-0.25b-owt").vocab_size == 50304
    assert load_model_config("llama-66m").vocab_size == 32000


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_with_labels(name):
    config = load_model_config(name)
    assert config.vocab_size == 4096 and config.max_position_embeddings == 512
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 5e6
    assert n == count_parameters(config)["total"]
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, config.vocab_size)
    assert torch.isfinite(out.loss)
    if name.startswith("qwen2moe"):
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    out.loss.backward()


def test_tiny_vocab_is_a_parameter():
    config = load_model_config("llama-tiny", vocab_size=1000)
    assert config.vocab_size == 1000
    assert count_parameters(config)["embedding"] == 2 * 1000 * config.hidden_size


def test_tiny_moe_activated_matches_independent_count():
    config = load_model_config("qwen2moe-tiny")
    counts = count_parameters(config)
    model = AutoModelForCausalLM.from_config(config)
    # Independent count: routed-expert parameters straight from the 3-D fused tensors' shapes.
    per_expert = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            assert p.shape[0] == config.num_experts
            per_expert += p[0].numel()
    hand = config.num_hidden_layers * 3 * config.hidden_size * config.moe_intermediate_size
    assert per_expert == hand
    total = sum(p.numel() for p in model.parameters())
    inactive = (config.num_experts - config.num_experts_per_tok) * per_expert
    assert counts["total"] == total
    assert counts["activated"] == total - inactive


def test_load_by_path_and_transformers_loaders(tmp_path):
    path = MODEL_CONFIGS_DIR / "qwen2moe-tiny.json"
    by_path = load_model_config(str(path))
    by_name = load_model_config("qwen2moe-tiny")
    assert by_path.to_dict() == by_name.to_dict()
    assert isinstance(Qwen2MoeConfig.from_json_file(str(path)), Qwen2MoeConfig)
    assert isinstance(LlamaConfig.from_dict(json.loads((MODEL_CONFIGS_DIR / "llama-66m.json").read_text())),
                      LlamaConfig)
    auto = AutoConfig.from_pretrained(str(MODEL_CONFIGS_DIR / "llama-tiny.json"))
    assert auto.model_type == "llama" and auto._gradpower["lr_max"] == 1e-3
    # the extra keys survive save/load
    auto.save_pretrained(tmp_path)
    assert load_model_config(tmp_path)._gradpower == auto._gradpower


def test_overrides_recompute_derived_fields():
    config = load_model_config("qwen2moe-tiny", num_hidden_layers=2)
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2


def test_unknown_name():
    with pytest.raises(ValueError, match="llama-66m") as err:
        load_model_config("llama-7b")
    assert "\n" not in str(err.value) and "llama-7b" in str(err.value)


def test_seq_len_too_long():
    config = load_model_config("llama-tiny")
    validate_model_config(config, seq_len=512)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        validate_model_config(config, seq_len=1024)


def test_top_k_above_experts():
    config = load_model_config("qwen2moe-tiny")
    config.num_experts_per_tok = config.num_experts + 1
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        validate_model_config(config)


def test_heads_do_not_divide_hidden():
    config = load_model_config("llama-tiny")
    config.num_attention_heads = 3
    config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        validate_model_config(config)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", -2), ("num_hidden_layers", 0), ("hidden_size", 0),
                                          ("num_attention_heads", -4), ("intermediate_size", -1), ("vocab_size", 0),
                                          ("num_key_value_heads", 2.5)])
def test_impossible_sizes_are_refused(tmp_path, field, value):
    """Written into a config JSON, as a user would: refused by loading (types) or by validation (values)."""
    data = json.loads((MODEL_CONFIGS_DIR / "llama-tiny.json").read_text())
    data[field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field) as err:
        validate_model_config(load_model_config(str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["num_experts", "moe_intermediate_size", "num_experts_per_tok"])
def test_impossible_moe_sizes_are_refused(field):
    config = load_model_config("qwen2moe-tiny")
    setattr(config, field, 0)
    with pytest.raises(ValueError, match=f"{field}=0.*positive integer"):
        validate_model_config(config)


def test_named_configs_ship_inside_the_package():
    import hf_gradpower

    assert MODEL_CONFIGS_DIR.parent.parent == Path(hf_gradpower.__file__).parent
    assert {p.stem for p in MODEL_CONFIGS_DIR.glob("*.json")} == set(PAPER) | set(TINY)
