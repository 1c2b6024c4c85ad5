"""The throughput benchmark: one timed duration per optimizer step, and the tokens/s arithmetic (never speed)."""

from __future__ import annotations

import json

import pytest

from benchmarks.throughput import StepTimer, main, summarize
from hf_gradpower.pretrain import run


def test_step_timer_records_one_duration_per_step(tmp_path):
    timer = StepTimer()
    run(["--model_config", "llama-tiny", "--max_steps", "3", "--seq_len", "32", "--global_batch_size", "2",
         "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--save_strategy", "no",
         "--disable_tqdm", "true", "--output_dir", str(tmp_path / "run")],
        callbacks=[timer])  # fmt: skip
    assert len(timer.durations) == 3
    assert all(t > 0 for t in timer.durations)


def test_summarize_tokens_per_second_and_ratio():
    times = {  # two rounds of 4 steps; the first step of each run is warm-up
        "adamw": [[9.0, 0.10, 0.10, 0.12], [9.0, 0.20, 0.20, 0.20]],
        "adampower": [[9.0, 0.25, 0.25, 0.25], [9.0, 0.20, 0.10, 0.20]],
    }
    s = summarize(times, warmup=1, tokens_per_step=1000)
    adamw, adampower = s["optimizers"]["adamw"], s["optimizers"]["adampower"]
    assert adamw["median_step_s"] == pytest.approx(0.16)  # median of .10 .10 .12 .20 .20 .20
    assert adamw["tokens_per_s"] == pytest.approx(1000 / 0.16)
    assert adamw["round_median_step_s"] == pytest.approx([0.10, 0.20])
    assert adamw["spread"] == pytest.approx(0.10 / 0.16)
    assert adampower["median_step_s"] == pytest.approx(0.225)
    assert s["ratio"] == pytest.approx(0.16 / 0.225)  # AdamPower tokens/s over AdamW's
    assert s["round_ratios"] == pytest.approx([0.10 / 0.25, 0.20 / 0.20])
    assert s["median_round_ratio"] == pytest.approx((0.10 / 0.25 + 1.0) / 2)


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_cli_writes_markdown_and_json(tmp_path, mode):
    result = main(["--steps", "3", "--warmup", "1", "--rounds", "1", "--seq_len", "32", "--batch", "2",
                   "--mode", mode, "--out", str(tmp_path)])  # fmt: skip
    stored = json.loads(next(tmp_path.glob("throughput_*.json")).read_text())
    assert [len(r) for o in ("adamw", "adampower") for r in stored["step_times_s"][o]] == [3, 3]
    assert stored["ratio"] == pytest.approx(result["ratio"])
    report = next(tmp_path.glob("throughput_*.md")).read_text()
    assert "AdamPower / AdamW throughput ratio" in report and "| adampower |" in report
    assert mode.capitalize() in report


def test_bad_cli_input_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--steps", "4", "--warmup", "4"])
    assert "--warmup must be >= 0 and below --steps (4), got 4" in capsys.readouterr().err
