"""run_pretrain: the default job end to end (shortened), config files, resume and its faults, and bad input
answered in one line before any work."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_gradpower.checkpoints import latest_checkpoint
from hf_gradpower.model_configs import MODEL_CONFIGS_DIR
from hf_gradpower.pretrain import InputError, main, parse_args, run

REPO = Path(__file__).resolve().parent.parent

QUICK_SETTINGS = {"seq_len": 64, "global_batch_size": 8, "per_device_train_batch_size": 8, "max_steps": 6,
                  "eval_steps": 3, "save_steps": 3, "logging_steps": 1, "eval_docs": 20, "max_eval_blocks": 8,
                  "disable_tqdm": "true"}


def quick(**changes) -> list[str]:
    """The default job, shortened to seconds; ``changes`` override single settings (None leaves one out)."""
    return [token for key, value in {**QUICK_SETTINGS, **changes}.items() if value is not None
            for token in (f"--{key}", str(value))]


QUICK = quick()


def losses(output_dir):
    history = json.loads((output_dir / "metrics.json").read_text())
    return {row["step"]: row["loss"] for row in history if "loss" in row}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The shortened default job, run once for the tests that compare against it."""
    return run(QUICK + ["--output_dir", str(tmp_path_factory.mktemp("full") / "run")])


def test_default_run_saves_weights_card_metrics_and_checkpoints(full, capsys):
    out = full
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "loss_curve.png",
                 "metrics.json", "metrics.csv", "gradpower.json", "checkpoint-3", "checkpoint-6"):
        assert (out / name).exists(), name
    info = json.loads((out / "gradpower.json").read_text())
    assert (info["optim"], info["gradpower_p"], info["schedule"], info["tokens"]) == ("adampower", 1.2, "cos", 6 * 8 * 64)
    card = (out / "README.md").read_text()
    assert "AdamPower(p=1.2)" in card and f"{info['final_eval_loss']:.4f}" in card
    train = losses(out)
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and train[6] < train[1]


def test_a_finished_run_is_never_overwritten(full):
    before = (full / "gradpower.json").read_text()
    with pytest.raises(InputError, match="holds an earlier run.*--overwrite_output_dir.*--resume_from_checkpoint"):
        run(QUICK + ["--output_dir", str(full)])
    assert (full / "gradpower.json").read_text() == before and latest_checkpoint(full).endswith("checkpoint-6")


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim: muonpower\ngradpower_p: 1.3\nmax_steps: 40\nschedule: wsd\n")
    model_args, _, args, facts = parse_args([str(cfg), "--max_steps", "20", "--output_dir", str(tmp_path)])
    assert (args.optim, args.gradpower_p, args.max_steps, model_args.schedule) == ("muonpower", 1.3, 20, "wsd")
    assert args.lr_scheduler_kwargs["num_decay_steps"] == 20 - 1 - 16  # wsd from the final max_steps
    assert (args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.95, 0.1, 1.0)  # the paper's baseline


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt"])
def test_resume_skips_an_unreadable_newest_checkpoint_and_continues_exactly(full, tmp_path, caplog, capsys, broken):
    """checkpoint-6 cut short (a full disk, a killed copy): resume falls back to checkpoint-3, says so, and
    steps 4-6 repeat the uninterrupted run's losses."""
    part = tmp_path / "part"
    part.mkdir()
    for step in (3, 6):
        shutil.copytree(full / f"checkpoint-{step}", part / f"checkpoint-{step}")
    cut = part / "checkpoint-6" / broken
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with caplog.at_level("INFO"):
        resumed = run(QUICK + ["--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    assert f"{broken} is truncated" in caplog.text and f"resuming from {part / 'checkpoint-3'}" in caplog.text
    want, got = losses(full), losses(resumed)
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-6)
    assert json.loads((resumed / "gradpower.json").read_text())["resumed_from"] == str(part / "checkpoint-3")
    printed = capsys.readouterr().out
    assert f"everything is in {part}/" in printed and "checkpoint-6" in printed


def _write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


def _bad_model_config(path):
    config = json.loads((MODEL_CONFIGS_DIR / "llama-tiny.json").read_text())
    config["num_hidden_layers"] = -2
    return _write(path, json.dumps(config))


BAD_INPUT = {  # case: (argv given tmp_path, what the line must say)
    "unknown model": (lambda p: ["--model_config", "llama-3b"], "llama-3b"),
    "unknown recipe": (lambda p: ["--recipe", "c5"], "unknown recipe 'c5'"),
    "unknown schedule": (lambda p: ["--schedule", "foo"], "--schedule: invalid choice: 'foo'"),
    "p = 0": (lambda p: ["--gradpower_p", "0"], "p must be finite and > 0"),
    "misspelt optimizer": (lambda p: ["--optim", "adampowr"], "did you mean adampower.*muonpower.*adamw_torch"),
    "sequence too long": (lambda p: ["--seq_len", "4096"], "4096"),
    "batch 0": (lambda p: ["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be a positive"),
    "negative lr": (lambda p: ["--learning_rate", "-1"], "--learning_rate must be > 0, got -1"),
    "beta2 = 1": (lambda p: ["--adam_beta2", "1.0"], r"--adam_beta2 must be in \[0, 1\)"),
    "batch not splitting": (lambda p: ["--global_batch_size", "30", "--per_device_train_batch_size", "8"],
                            "not a multiple"),
    "missing dataset": (lambda p: ["--dataset", "no/such/file.jsonl"], "not found: 'no/such/file.jsonl'"),
    "binary dataset": (lambda p: ["--dataset", _write(p / "weights.jsonl", bytes(range(256)) * 64)],
                       "not UTF-8 text"),
    "empty dataset": (lambda p: ["--dataset", _write(p / "empty.jsonl", "")], "is empty"),
    "truncated JSON config": (lambda p: [_write(p / "run.json", '{"max_steps": 5, "optim": "ad')], "not valid JSON"),
    "truncated YAML config": (lambda p: [_write(p / "run.yaml", "max_steps: 5\noptim: [adamw\n")], "not valid YAML"),
    "negative layers": (lambda p: ["--model_config", _bad_model_config(p / "bad.json")], "num_hidden_layers=-2"),
    "unknown flag": (lambda p: ["--max_stepz", "5"], "unrecognized arguments: --max_stepz"),
    "nothing to resume": (lambda p: ["--resume_from_checkpoint", "latest"], "no complete checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_before_any_work(tmp_path, capsys, case):
    make, match = BAD_INPUT[case]
    out = tmp_path / "never"
    assert main(make(tmp_path) + ["--output_dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("run_pretrain.py: error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(match, captured.err), captured.err
    assert not out.exists()


def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["--output_dir", str(blocker / "run")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-3").write_text("")  # where the first checkpoint goes
    assert main(QUICK + ["--output_dir", str(tmp_path / "run")]) == 2
    assert "checkpoint-3 is a file where a checkpoint folder goes" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("HF_GRADPOWER_DEBUG", "1")
    with pytest.raises(InputError, match="unknown recipe") as err:
        main(["--recipe", "c5"])
    assert isinstance(err.value.__cause__, ValueError)  # the original error, with its traceback


def test_moe_top_k_above_experts_is_refused(tmp_path):
    config = json.loads((MODEL_CONFIGS_DIR / "qwen2moe-tiny.json").read_text())
    config["num_experts_per_tok"] = config["num_experts"] + 1
    path = tmp_path / "bad-moe.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        run(["--model_config", str(path), "--output_dir", str(tmp_path / "never")])


def _cli(*args):
    return [sys.executable, str(REPO / "run_pretrain.py"), *args]


def test_two_processes_reproduce_one_process_with_the_same_global_batch(full, tmp_path):
    """2 gloo processes x 4 sequences == 1 process x 8 sequences, with the default per-device batch.

    `accelerate launch --multi_gpu --num_processes 2` starts two gloo processes on this CPU machine (the
    README's command); the script splits the global batch over the processes, so it stays 8.
    """
    pytest.importorskip("accelerate")
    single = full
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    argv = quick(per_device_train_batch_size=None)
    proc = subprocess.run(launch + _cli(*argv, "--output_dir", str(tmp_path / "two"))[1:], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "gradpower.json").read_text())
    state = json.loads((tmp_path / "two" / "checkpoint-6" / "trainer_state.json").read_text())
    assert info["global_batch"] == 8 and state["train_batch_size"] == 4
    two, one = losses(tmp_path / "two"), losses(single)
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)


def test_the_script_answers_bad_input_without_a_traceback(tmp_path):
    proc = subprocess.run(_cli("--per_device_train_batch_size", "0", "--output_dir", str(tmp_path / "never")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "run_pretrain.py" in line]
    assert lines == ["run_pretrain.py: error: --per_device_train_batch_size must be a positive integer, got 0"]


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


def test_streaming_data_tensorboard_logging_and_bare_boolean_flags(tmp_path):
    out = run(quick(max_steps=4, eval_steps=2, save_steps=4) + ["--streaming", "true", "--report_to", "tensorboard",
                                                              "--use_cpu", "--gradient_checkpointing",
                                                              "--output_dir", str(tmp_path / "stream")])
    assert sorted(losses(out)) == [1, 2, 3, 4]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.use_cpu, args.gradient_checkpointing) == (True, True)
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
