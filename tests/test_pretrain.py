"""run_pretrain: the default job end to end (shortened), config files, resume, and bad input caught early."""

from __future__ import annotations

import json
import shutil

import pytest

from hf_gradpower.pretrain import parse_args, run

QUICK = ["--seq_len", "64", "--global_batch_size", "8", "--per_device_train_batch_size", "8", "--max_steps", "6",
         "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--eval_docs", "20",
         "--max_eval_blocks", "8", "--disable_tqdm", "true"]


def losses(output_dir):
    history = json.loads((output_dir / "metrics.json").read_text())
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def test_default_run_saves_weights_card_metrics_and_checkpoints(tmp_path):
    out = run(QUICK + ["--output_dir", str(tmp_path / "run")])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "loss_curve.png",
                 "metrics.json", "metrics.csv", "gradpower.json", "checkpoint-3", "checkpoint-6"):
        assert (out / name).exists(), name
    info = json.loads((out / "gradpower.json").read_text())
    assert (info["optim"], info["gradpower_p"], info["schedule"], info["tokens"]) == ("adampower", 1.2, "cos", 6 * 8 * 64)
    card = (out / "README.md").read_text()
    assert "AdamPower(p=1.2)" in card and f"{info['final_eval_loss']:.4f}" in card
    train = losses(out)
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and train[6] < train[1]


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim: muonpower\ngradpower_p: 1.3\nmax_steps: 40\nschedule: wsd\n")
    model_args, _, args, facts = parse_args([str(cfg), "--max_steps", "20", "--output_dir", str(tmp_path)])
    assert (args.optim, args.gradpower_p, args.max_steps, model_args.schedule) == ("muonpower", 1.3, 20, "wsd")
    assert args.lr_scheduler_kwargs["num_decay_steps"] == 20 - 1 - 16  # wsd from the final max_steps
    assert (args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.95, 0.1, 1.0)  # the paper's baseline


def test_global_batch_is_kept_by_accumulation(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, _, args, facts = parse_args(["--global_batch_size", "32", "--per_device_train_batch_size", "4",
                                    "--output_dir", str(tmp_path)])
    assert args.gradient_accumulation_steps == 4 and facts["global_batch"] == 32


def test_resume_continues_with_the_uninterrupted_losses(tmp_path):
    full = run(QUICK + ["--output_dir", str(tmp_path / "full")])
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    resumed = run(QUICK + ["--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    want, got = losses(full), losses(resumed)
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-6)


@pytest.mark.parametrize("argv, match", [
    (["--model_config", "llama-3b"], "llama-3b"),
    (["--recipe", "c5"], "unknown recipe 'c5'"),
    (["--schedule", "linear"], "unknown schedule 'linear'"),
    (["--optim", "adampwoer"], "adampwoer"),
    (["--seq_len", "4096"], "4096"),
    (["--global_batch_size", "30", "--per_device_train_batch_size", "8"], "not a multiple"),
    (["--dataset", "no/such/file.jsonl"], "no/such/file.jsonl"),
])
def test_bad_input_fails_in_one_line_before_any_work(tmp_path, argv, match):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match) as err:
        run(argv + ["--output_dir", str(out)])
    assert "\n" not in str(err.value).strip()
    assert not out.exists()


def test_moe_top_k_above_experts_is_refused(tmp_path):
    from hf_gradpower.model_configs import load_model_config

    config = load_model_config("qwen2moe-tiny").to_dict()
    config["num_experts_per_tok"] = config["num_experts"] + 1
    path = tmp_path / "bad-moe.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        run(["--model_config", str(path), "--output_dir", str(tmp_path / "never")])


def test_empty_data_file_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run(["--dataset", str(empty), "--output_dir", str(tmp_path / "never")])
