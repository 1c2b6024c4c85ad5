"""The CPU reproduction suite: summary arithmetic, spike counting, plan sizing and compatibility, and the
--smoke suite end to end (resumable)."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

import benchmarks.reproduce_runs as reproduce_runs
from benchmarks.reproduce import main
from benchmarks.reproduce_plan import (
    Plan,
    all_specs,
    comparisons,
    estimate_seconds,
    long_comparison,
    long_specs,
    noise_specs,
    short_specs,
)
from benchmarks.reproduce_report import count_spikes, evals_lower, summarize_pair
from benchmarks.reproduce_runs import load_plan, make_plan, train_seconds_per_step

REPO = Path(__file__).resolve().parent.parent
OLD_PLAN = {"smoke": False, "seeds": 3, "steps": 230, "step_time": 0.13729, "overhead": 0.806, "eval_docs": 50,
            "max_eval_blocks": 64}  # fmt: skip


def test_summarize_pair_known_numbers():
    s = summarize_pair([3.0, 3.2, 3.4], [2.9, 3.0, 3.2])
    assert s["n"] == 3
    assert s["baseline_mean"] == pytest.approx(3.2)
    assert s["baseline_std"] == pytest.approx(0.2)
    assert s["gradpower_mean"] == pytest.approx(9.1 / 3)
    assert s["gradpower_std"] == pytest.approx(math.sqrt(0.07 / 3))
    # paired differences -0.1, -0.2, -0.2: mean -1/6, std sqrt(1/300), SE = std / sqrt(3) = 1/30
    assert s["diff"] == pytest.approx(-1 / 6)
    assert s["diff_se"] == pytest.approx(1 / 30)
    assert s["exceeds_noise"] is True  # 0.1667 > 2 x 0.0333


def test_summarize_pair_noise_flag_false_and_single_seed():
    s = summarize_pair([3.0, 3.2], [3.1, 3.1])  # differences +0.1, -0.1: mean 0, inside the noise
    assert s["diff"] == pytest.approx(0.0)
    assert s["exceeds_noise"] is False
    one = summarize_pair([3.0], [2.5])
    assert one["diff"] == pytest.approx(-0.5)
    assert one["exceeds_noise"] is None and math.isnan(one["diff_se"])
    with pytest.raises(ValueError):
        summarize_pair([1.0, 2.0], [1.0])


def test_count_spikes():
    flat = [5.0] * 30
    assert count_spikes(flat) == 0
    spiky = list(flat)
    spiky[10] = 5.2  # +0.2 over the running median: a spike
    spiky[20] = 5.05  # +0.05: below the 0.1 threshold
    assert count_spikes(spiky) == 1
    assert count_spikes([9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]) == 1  # only from the 6th loss on


def test_train_seconds_per_step_leaves_out_evaluations_during_training():
    history = [
        {"loss": 8.0, "step": 5},
        {"eval_loss": 7.5, "eval_runtime": 0.5, "step": 5},
        {"eval_loss": 7.0, "eval_runtime": 0.7, "step": 10},
        {"train_runtime": 3.2, "step": 10},
        {"eval_loss": 7.0, "eval_runtime": 0.9, "step": 10},  # after training: not inside train_runtime
    ]
    assert train_seconds_per_step(history, 10) == pytest.approx((3.2 - 0.5 - 0.7) / 10)
    with pytest.raises(ValueError, match="train_runtime"):
        train_seconds_per_step(history[:3], 10)


def test_train_seconds_per_step_on_a_committed_run():
    """Runs cached before the change stored the full log history, so they work as they are."""
    run = json.loads(
        (REPO / "docs/reproduction/runs/llama-tiny_adamw_wsd_b8_s230_log4_seed0.json").read_text()
    )
    evals = sum(r["eval_runtime"] for r in run["log_history"] if "eval_runtime" in r)
    got = train_seconds_per_step(run["log_history"], 230)
    assert got == pytest.approx((run["train_runtime"] - evals) / 230)
    assert got < run["s_per_step"]


def _run(evals: dict[int, float]) -> dict:
    return {
        "log_history": [{"loss": 9.0, "step": 1}] + [{"eval_loss": v, "step": s} for s, v in evals.items()]
    }


def test_evals_lower_counts_steps_where_the_mean_is_lower():
    baseline = [_run({10: 7.0, 20: 6.0, 30: 5.0}), _run({10: 7.2, 20: 6.2, 30: 5.2})]  # means 7.1, 6.1, 5.1
    gradpower = [
        _run({10: 7.3, 20: 6.0, 30: 5.0}),
        _run({10: 7.1, 20: 6.1, 30: 5.1}),
    ]  # means 7.2, 6.05, 5.05
    assert evals_lower(baseline, gradpower) == (2, 3)
    assert evals_lower(gradpower, baseline) == (1, 3)
    assert evals_lower(baseline, baseline) == (0, 3)  # equal is not lower
    # only steps every run evaluated count
    assert evals_lower([_run({10: 7.0, 20: 6.0})], [_run({10: 6.0, 15: 1.0})]) == (1, 1)


def test_old_plan_keeps_its_steps_and_gains_the_long_regime(tmp_path, monkeypatch):
    monkeypatch.setattr(
        reproduce_runs, "calibrate", lambda *a: pytest.fail("an existing plan must not be re-sized")
    )
    (tmp_path / "plan.json").write_text(json.dumps(OLD_PLAN))
    plan = make_plan(Namespace(out=tmp_path, smoke=False, seeds=3, budget_min=60.0))
    assert (plan.steps, plan.long_steps, plan.step_time) == (230, 2000, 0.13729)
    assert json.loads((tmp_path / "plan.json").read_text()) == {**OLD_PLAN, "long_steps": 2000}


def test_committed_reproduction_only_lacks_the_long_and_p_schedule_runs():
    """``--out docs/reproduction`` reuses every committed run; only comparison 8's 6 runs and the p-schedule
    runs (9-13) can be missing."""
    plan = load_plan(REPO / "docs/reproduction/plan.json")
    assert plan.long_steps == 2000
    runs = REPO / "docs/reproduction/runs"
    assert all((runs / f"{r.key}.json").exists() for r in short_specs(plan))
    long = long_specs(plan)
    assert len(long) == 6 and {r.steps for r in long} == {2000} and {r.seed for r in long} == {0, 1, 2}
    missing = {r for r in all_specs(plan) if not (runs / f"{r.key}.json").exists()}
    assert missing <= set(long) | set(noise_specs(plan, long=False)) | set(noise_specs(plan, long=True))
    # paired: per seed the same spec but the optimizer
    for b, g in long_comparison(plan)["pairs"]:
        assert (b.optim, g.optim, g.p) == ("adamw", "adampower", 1.2) and b.seed == g.seed
        assert (b.schedule, b.batch, b.logging_steps) == ("wsd", 8, 20)


def test_new_plan_sizes_the_short_regime_to_what_the_long_one_leaves(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce_runs, "calibrate", lambda *a: (0.1, 1.0))
    args = Namespace(out=tmp_path, smoke=False, seeds=3, budget_min=60.0)
    plan = make_plan(args)
    long_cost = estimate_seconds(long_specs(plan), plan)
    assert long_cost > 6 * 2000 * 0.1  # 6 long runs at a fixed 2000 steps, counted first
    short = list(dict.fromkeys(short_specs(plan)))
    assert long_cost + estimate_seconds(short, plan) <= 60 * 60
    longer = Plan(**{**vars(plan), "steps": plan.steps + 20})  # a bit longer would not fit
    assert long_cost + estimate_seconds(list(dict.fromkeys(short_specs(longer))), longer) > 60 * 60
    (tmp_path / "plan.json").unlink()
    assert make_plan(Namespace(**{**vars(args), "budget_min": 5.0})).steps == 50  # clamped as before


def test_bad_cli_input_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "0"])
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_smoke_suite_and_resume(tmp_path):
    out = tmp_path / "repro"
    report = main(["--smoke", "--out", str(out)])
    text = report.read_text()
    for comp in comparisons(Plan(True, 1, 8, 0.1, 1.0, 10, 8)):
        assert any(line.startswith(f"| {comp['name']} |") for line in text.splitlines()), comp["name"]
    assert "## 6. p sweep" in text and "## 7. Best p vs batch size" in text
    long = long_comparison(Plan(True, 1, 8, 0.1, 1.0, 10, 8, long_steps=12))
    assert f"## {long['name']}: 12 steps" in text
    assert any(line.startswith(f"| {long['name']} |") for line in text.splitlines())
    assert "## Two regimes" in text
    regimes = [line for line in text.splitlines() if line.startswith(("| short | 2.", "| long | 8."))]
    assert len(regimes) == 2 and long["name"] in regimes[1]
    assert all(line.endswith(" of 1 |") and "| AdamPower " in line for line in regimes)  # generated direction
    # comparisons 9-17: every variant in both regimes, a verdict per regime and the goal per schedule
    assert "## 9-17. p schedules and auto p" in text
    for regime in ("short", "long"):
        assert f"- **{regime} regime**: auto vs AdamW" in text
        for variant in ("AdamW", "AdamPower p=1.2", "AdamPower p=linear:0.9:1.2", "AdamPower p=auto",
                        "AdamPower p=linear:0.9:1.2:400", "AdamPower p=linear:1.0:1.2:400"):
            assert any(line.startswith(f"| {regime} | {variant} |") for line in text.splitlines()), variant
    assert any(line.startswith("| short | MuonPower p=auto |") for line in text.splitlines())
    goals = [line for line in text.splitlines() if line.startswith("- Goal (")]
    assert len(goals) == 4 and all(("**met**" in g) != ("not met: " in g) for g in goals)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 18  # 5 comparisons + p sweep + best p vs batch + long regime + 9-17 + noise figure
    assert all(p.stat().st_size > 1000 for p in pngs)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 35  # 24 + 5 short-regime p-schedule runs, 2 long-regime + 4 long p-schedule runs
    auto = [p for p in runs if "pauto" in p.name]
    assert auto and all("noise/b_simple" in json.dumps(json.loads(p.read_text())["log_history"]) for p in auto)
    mtimes = {p: p.stat().st_mtime_ns for p in runs}

    main(["--smoke", "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in runs} == mtimes  # nothing retrained

    # a report from an incomplete cache lists what has not run instead of failing
    next(p for p in auto if "s12" in p.name).unlink()
    text = main(["--smoke", "--out", str(out), "--report_only"]).read_text()
    assert "Not run yet" in text and "13. LLaMA AdamW vs AdamPower p auto (long, wsd)" in text
    assert not any(p.name.startswith("llama-tiny_adampower_wsd_pauto") and "s12" in p.name
                   for p in (out / "runs").glob("*.json"))  # --report_only trained nothing
