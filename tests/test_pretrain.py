"""run_pretrain: the default job end to end (shortened), config files, resume, and bad input caught early."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_gradpower.checkpoints import latest_checkpoint
from hf_gradpower.pretrain import parse_args, run

REPO = Path(__file__).resolve().parent.parent

QUICK_SETTINGS = {"seq_len": 64, "global_batch_size": 8, "per_device_train_batch_size": 8, "max_steps": 6,
                  "eval_steps": 3, "save_steps": 3, "logging_steps": 1, "eval_docs": 20, "max_eval_blocks": 8,
                  "disable_tqdm": "true"}


def quick(**changes) -> list[str]:
    """The default job, shortened to seconds; ``changes`` override single settings."""
    return [token for key, value in {**QUICK_SETTINGS, **changes}.items() for token in (f"--{key}", str(value))]


QUICK = quick()


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


def _cli(*args):
    return [sys.executable, str(REPO / "run_pretrain.py"), *args]


def test_two_processes_reproduce_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo processes x 2 sequences x 2 accumulation steps == 1 process x 8 sequences.

    `accelerate launch --multi_gpu --num_processes 2` starts two gloo processes on this CPU machine; the
    script derives the accumulation from the number of processes so the global batch stays 8.
    """
    pytest.importorskip("accelerate")
    single = run(QUICK + ["--output_dir", str(tmp_path / "one")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    argv = quick(per_device_train_batch_size=2)
    proc = subprocess.run(launch + _cli(*argv, "--output_dir", str(tmp_path / "two"))[1:], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "gradpower.json").read_text())
    state = json.loads((tmp_path / "two" / "checkpoint-6" / "trainer_state.json").read_text())
    assert info["global_batch"] == 8 and state["train_batch_size"] == 2
    two, one = losses(tmp_path / "two"), losses(single)
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)


def test_sigkill_mid_run_then_restart_loses_at_most_save_steps(tmp_path):
    out = tmp_path / "killed"
    argv = quick(max_steps=12, save_steps=2) + ["--output_dir", str(out)]
    proc = subprocess.Popen(_cli(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before its 4th step"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a save interrupted half-way: the newest folder has weights but no trainer state
    broken = out / "checkpoint-10"
    shutil.copytree(out / "checkpoint-4", broken)
    (broken / "trainer_state.json").write_text('{"global_step": 1')  # truncated
    assert latest_checkpoint(out) is not None and not latest_checkpoint(out).endswith("-10")

    restarted = subprocess.run(_cli(*argv, "--resume_from_checkpoint", "latest"), capture_output=True, text=True,
                               timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    uninterrupted = run(quick(max_steps=12, save_steps=2) + ["--output_dir", str(tmp_path / "whole")])
    got, want = losses(out), losses(uninterrupted)
    assert max(got) == 12
    assert [got[s] for s in range(min(got), 13)] == pytest.approx([want[s] for s in range(min(got), 13)], rel=1e-5)


class FakeHub:
    """Stands in for the Hub's HTTP API (unreachable here); records what would be uploaded."""

    def __init__(self):
        self.uploads: list[set[str]] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.uploads.append({p.name for p in Path(folder_path).iterdir()})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}")


def test_push_to_hub_uploads_weights_and_our_model_card(tmp_path, monkeypatch):
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    out = run(quick(save_steps=6) + ["--output_dir", str(tmp_path / "pushed"), "--push_to_hub", "true",
                                     "--hub_strategy", "end"])
    final = hub.uploads[-1]
    assert {"model.safetensors", "config.json", "README.md", "loss_curve.png", "gradpower.json"} <= final
    assert "AdamPower(p=1.2)" in (out / "README.md").read_text()  # not replaced by Trainer's generic card


def test_streaming_data_and_tensorboard_logging(tmp_path):
    out = run(quick(max_steps=4, eval_steps=2, save_steps=4) + ["--streaming", "true", "--report_to", "tensorboard",
                                                              "--output_dir", str(tmp_path / "stream")])
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
