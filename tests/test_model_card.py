"""The model card a run writes reads as Hub metadata (huggingface_hub.ModelCard parses it; no network)."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from hf_gradpower import evaluation
from hf_gradpower.model_card import write_model_card

RUN = {
    "recipe": "tiny",
    "model_config": "llama-tiny",
    "architecture": "LlamaForCausalLM",
    "parameters": 2_098_304,
    "optim": "adampower",
    "gradpower_p": 1.2,
    "gradpower_order": "before_clip",
    "schedule": "cos",
    "learning_rate": 1e-3,
    "dataset": "embedded",
    "tokenizer": "embedded",
    "seq_len": 64,
    "global_batch": 8,
    "max_steps": 6,
    "tokens": 3072,
}
HISTORY = [{"step": 3, "loss": 8.1}, {"step": 6, "loss": 7.9}, {"step": 6, "eval_loss": 7.95}]


def _lm_eval(acc: dict[str, float]) -> dict:
    return {"results": {task: {"acc,none": v, "acc_stderr,none": 0.1} for task, v in acc.items()}}


def test_card_front_matter_names_library_tags_dataset_and_recipe(tmp_path):
    path = write_model_card(tmp_path, RUN, HISTORY)
    card = ModelCard.load(path)  # parses the YAML front matter into ModelCardData
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"gradpower", "adampower", "arxiv:2505.24275"} <= set(data.tags)
    assert data.datasets == ["allenai/c4"]  # the shipped sample is C4's
    assert data.training_recipe["gradpower_p"] == 1.2 and data.training_recipe["global_batch"] == 8
    assert "AdamPower(p=1.2)" in card.text and "7.9500" in card.text
    assert json.loads((tmp_path / "gradpower.json").read_text())["final_eval_loss"] == 7.95


def test_local_data_names_no_hub_dataset(tmp_path):
    data = ModelCard.load(write_model_card(tmp_path, {**RUN, "dataset": "my_corpus/*.jsonl"}, HISTORY)).data
    assert data.datasets is None and data.library_name == "transformers"


def test_update_model_card_adds_model_index_per_checkpoint(tmp_path):
    runs = [tmp_path / "adamw", tmp_path / "adampower"]
    write_model_card(runs[0], {**RUN, "optim": "adamw", "gradpower_p": None}, HISTORY)
    write_model_card(runs[1], RUN, HISTORY)
    ckpts = [
        evaluation.Checkpoint(r, label) for r, label in zip(runs, ("AdamW", "AdamPower(p=1.2)"), strict=True)
    ]
    results = [
        _lm_eval({"arc_tiny": 0.375, "piqa_tiny": 0.5}),
        _lm_eval({"arc_tiny": 0.5, "piqa_tiny": 0.625}),
    ]
    table = evaluation.build_table(ckpts, results, ["arc_tiny", "piqa_tiny"])
    section = evaluation.card_section(table)
    for i, run in enumerate(runs):  # twice: a rerun replaces the section and the results, adds nothing
        evaluation.update_model_card(run, section, evaluation.card_scores(table, i))
        evaluation.update_model_card(run, section, evaluation.card_scores(table, i))
    card = ModelCard.load(runs[1] / "README.md")
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("arc_tiny", "acc"): 50.0, ("piqa_tiny", "acc"): 62.5}
    assert (
        card.data.model_name == "adampower"
        and card.data.eval_results[0].source_name == "lm-evaluation-harness"
    )
    assert card.text.count(evaluation.CARD_SECTION) == 1 and "gradpower" in card.data.tags
    assert {r.metric_value for r in ModelCard.load(runs[0] / "README.md").data.eval_results} == {37.5, 50.0}
