"""Blockwise LR (Wang et al. 2025) in the optimizer builder, combinable with any optimizer and GradPower."""

from __future__ import annotations

import pytest
from conftest import patterned_tokens, tiny_llama, tiny_qwen2moe
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import hf_gradpower as gp
from hf_gradpower.optimizers import BLOCKWISE_LR_RATIOS, block_of

EXPECTED = {
    "model.embed_tokens.weight": "embedding", "lm_head.weight": "head",
    "model.layers.0.self_attn.q_proj.weight": "qk", "model.layers.0.self_attn.k_proj.bias": "qk",
    "model.layers.1.self_attn.v_proj.weight": "vo", "model.layers.1.self_attn.o_proj.weight": "vo",
    "model.layers.0.mlp.experts.gate_up_proj": "ffn", "model.layers.0.mlp.gate.weight": "ffn",
    "model.layers.0.mlp.shared_expert.down_proj.weight": "ffn", "model.layers.0.input_layernorm.weight": "norm",
    "model.norm.weight": "norm",
}


def test_block_names():
    for name, block in EXPECTED.items():
        assert block_of(name) == block, name


@pytest.mark.parametrize("name", ["adamw", "adampower", "muonpower", "sgdpower"])
def test_each_parameter_gets_base_lr_times_its_block_ratio(name):
    model = tiny_qwen2moe()
    opt = gp.build_optimizer(model, name, lr=1e-3, weight_decay=0.1, blockwise_lr={"head": 2.0})
    ratios = {**BLOCKWISE_LR_RATIOS, "head": 2.0}
    seen = {}
    for group in opt.param_groups:
        for pname in group["param_names"]:
            seen[pname] = group["lr"]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    for pname, lr in seen.items():
        assert lr == pytest.approx(1e-3 * ratios[block_of(pname)]), pname
    assert (gp.gradpower_p(opt) == 1.2) == name.endswith("power")


def test_ratios_hold_along_the_schedule_and_training_runs():
    model = tiny_llama()
    opt = gp.build_optimizer(model, "adampower", lr=1e-3, blockwise_lr=True)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 2, 10, min_lr_rate=0.1)
    batch = patterned_tokens(4, 12)
    for _ in range(5):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    by_block = {g["block"]: g["lr"] for g in opt.param_groups}
    assert by_block["embedding"] / by_block["norm"] == pytest.approx(10.0)
    assert by_block["qk"] / by_block["vo"] == pytest.approx(2.0)


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="unknown blockwise_lr blocks \\['attn'\\]"):
        gp.build_optimizer(tiny_llama(), "adamw", lr=1e-3, blockwise_lr={"attn": 3.0})
