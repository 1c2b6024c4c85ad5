"""The CPU reproduction suite: summary arithmetic, spike counting, a plan fixed by the suite's definition,
the which-p selection and validation, the report from an incomplete cache, and the --smoke suite end to end
(resumable)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

import benchmarks.reproduce as reproduce
from benchmarks.reproduce import main
from benchmarks.reproduce_pairs import count_spikes, evals_lower, summarize_pair
from benchmarks.reproduce_plan import (
    P_GRID,
    Speed,
    all_specs,
    comparisons,
    fresh_seeds,
    long_comparison,
    p_grid,
    p_run,
    p_runs,
    short_specs,
    suite_plan,
    sweep_seeds,
)
from benchmarks.reproduce_runs import train_seconds_per_step
from benchmarks.reproduce_which_p import evidence, study, verdict
from hf_gradpower.probe import load_evidence

REPO = Path(__file__).resolve().parent.parent
FULL = suite_plan(smoke=False, seeds=3)


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
    """A stored run holds its full log history, so the step time comes from the file alone."""
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


def _plan_of(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def test_the_plan_is_the_same_on_a_slow_and_a_fast_machine(tmp_path, monkeypatch, capsys):
    """Steps, seeds and evaluations come from the suite's definition; the measured speed only changes the
    printed estimate."""
    plans, lines = [], []
    for speed in (Speed(5.0, 30.0), Speed(0.01, 0.5)):  # a very slow and a very fast machine
        monkeypatch.setattr(reproduce, "calibrate", lambda smoke, runs, speed=speed: speed)
        for only in ([], ["--only", "s230", "seed1"]):
            out = tmp_path / f"{speed.step_time}{len(only)}"
            main(["--out", str(out), "--dry_run", "--budget_min", "60", *only])
            plans.append(_plan_of(out))
            lines.append(capsys.readouterr().out)
    assert all(p == plans[0] for p in plans)
    assert (plans[0]["steps"], plans[0]["long_steps"], plans[0]["seeds"]) == (230, 2000, 3)
    assert lines[0].split("measured")[0] == lines[2].split("measured")[0]  # same runs and steps printed
    assert "over the 60-minute budget" in lines[0] and "within the 60-minute budget" in lines[2]
    assert not list(tmp_path.glob("*/runs/*.json"))  # nothing trained


def test_bad_cli_input_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "0"])
    assert "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--only", "no-such-run", "--report_only"])
    assert "--only no-such-run matches no run of the suite" in capsys.readouterr().err


def test_which_p_runs_share_the_stored_keys():
    """p = 1 is the baseline optimizer's own run, so the sweep reuses comparisons 2, 4 and 8 and the runs
    already stored; both regimes, seeds 0-2 for the sweep, 3-5 for the validation."""
    specs = {r.key for r in all_specs(FULL, {})}
    for key in (
        "llama-tiny_adampower_wsd_p0.8_b8_s230_log4_seed1",
        "llama-tiny_adamw_wsd_b8_s230_log4_seed0",
        "llama-tiny_muonpower_wsd_p1.3_b8_s2000_log20_seed2",
        "llama-tiny_muon_wsd_b8_s2000_log20_seed0",
        "llama-tiny_adampower_wsd_p1.5_b8_s2000_log20_seed0",
        "llama-tiny_adamw_wsd_b8_s2000_log20_seed5",
        "llama-tiny_muonpower_wsd_p1.2_b8_s230_log4_seed3",
    ):
        assert key in specs, key
    assert p_grid(FULL, "adampower") == (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)
    assert p_grid(FULL, "muonpower") == (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    assert (list(sweep_seeds(FULL)), list(fresh_seeds(FULL))) == ([0, 1, 2], [3, 4, 5])
    assert p_run(FULL, "muonpower", 1.0, True, 4).key == "llama-tiny_muon_wsd_b8_s2000_log20_seed4"
    # before the sweep is complete only the baseline and p = 1.2 are validated
    assert not any(
        k.startswith("llama-tiny_adampower_wsd_p0.9") and k.endswith(("seed3", "seed4")) for k in specs
    )


def _sweep_results(optim: str, long: bool, best: float, fresh: dict[float, float]) -> dict[str, dict]:
    """Final eval losses: on the sweep seeds ``best`` lowest (0.01 per 0.1 of p away), seed offsets shared;
    on the fresh seeds the mean loss of each validated p given by ``fresh``."""
    out = {}
    for p in p_grid(FULL, optim):
        for seed in sweep_seeds(FULL):
            out[p_run(FULL, optim, p, long, seed).key] = {
                "final_eval_loss": 5.0 + abs(p - best) / 10 + seed / 100
            }
    for p, loss in fresh.items():
        for i, seed in enumerate(fresh_seeds(FULL)):
            out[p_run(FULL, optim, p, long, seed).key] = {"final_eval_loss": loss + (i - 1) / 50 + p / 1000}
    return out


def test_the_sweeps_choice_is_validated_on_fresh_seeds_and_a_failed_choice_is_said():
    results = _sweep_results("adampower", True, best=0.9, fresh={})
    specs = {r.key for r in all_specs(FULL, results)}
    assert {p_run(FULL, "adampower", 0.9, True, s).key for s in (3, 4, 5)} <= specs  # the choice, fresh seeds
    s = study(FULL, "adampower", True, results)
    assert s["selected_p"] == 0.9 and s["validation"]["done"] == 0 and s["validated"] is False
    assert "Validation on fresh seeds not yet run (0 of 9)" in verdict(s)

    # on the fresh seeds p = 0.9 loses to AdamW, p = 1.2 wins: the choice does not hold, 1.2 is recommended
    results |= _sweep_results("adampower", True, best=0.9, fresh={1.0: 5.0, 0.9: 5.05, 1.2: 4.95})
    s = study(FULL, "adampower", True, results)
    words = verdict(s)
    assert s["recommended_p"] == 1.2 and s["validated"] is True
    assert "the choice **does not hold: worse** beyond seed noise" in words and "Use **p = 1.2**" in words
    # neither beats AdamW: the baseline is recommended
    results |= _sweep_results("adampower", True, best=0.9, fresh={1.0: 5.0, 0.9: 5.05, 1.2: 5.0})
    assert study(FULL, "adampower", True, results)["recommended_p"] == 1.0
    # the choice holds and is the lower of the two winners
    results |= _sweep_results("adampower", True, best=0.9, fresh={1.0: 5.0, 0.9: 4.9, 1.2: 4.95})
    s = study(FULL, "adampower", True, results)
    assert s["recommended_p"] == 0.9 and "the choice **holds**" in verdict(s)


def test_until_validated_the_evidence_is_p_1_2_against_the_baseline_on_the_sweep_seeds():
    """A partial sweep never recommends its current best; p = 1.2 vs the baseline over the paired seeds does."""
    results = _sweep_results("muonpower", False, best=0.8, fresh={})
    del results[p_run(FULL, "muonpower", 1.3, False, 2).key]  # the sweep is one run short
    s = study(FULL, "muonpower", False, results)
    assert s["selected_p"] is None and s["sweep_done"] == (17, 18)
    vs = s["grid"]["1.2"]["vs_baseline"]
    assert vs["diff"] == pytest.approx(0.02) and s["recommended_p"] == 1.0 and s["validated"] is False
    assert "sweep not yet run (17 of 18)" in verdict(s)


def test_committed_reproduction_reuses_every_committed_run():
    """``--out docs/reproduction`` reuses the committed runs; comparisons 1-5 and 7 are complete."""
    runs = REPO / "docs/reproduction/runs"
    assert all((runs / f"{r.key}.json").exists() for r in short_specs(FULL))
    suite = {r.key for r in all_specs(FULL, reproduce.cached(FULL, runs))}
    assert {p.stem for p in runs.glob("*.json")} <= suite
    for b, g in long_comparison(FULL)["pairs"]:
        assert (b.optim, g.optim, g.p) == ("adamw", "adampower", 1.2) and b.seed == g.seed
        assert (b.schedule, b.batch, b.logging_steps, b.steps) == ("wsd", 8, 20, 2000)


def test_shipped_evidence_is_the_committed_reports():
    """The probe's table in the package is what the committed report computed."""
    summary = json.loads((REPO / "docs/reproduction/summary.json").read_text())
    shipped = [e for e in load_evidence() if e.source == "ours"]
    assert shipped == evidence(summary["which_p"])
    assert all(e.validated or e.p in (1.0, 1.2) for e in shipped)  # an unvalidated sweep never decides


def test_choosing_p_page_shows_the_shipped_evidence():
    """docs/choosing_p.md's evidence table quotes every entry the probe ships, so the page and the probe agree."""
    page = (REPO / "docs/choosing_p.md").read_text()
    for e in load_evidence():
        if e.source == "ours":
            assert f"| {e.p:g} | {e.basis} |" in page, e


def test_report_from_an_incomplete_cache(tmp_path):
    """--report_only writes every section from what is cached and lists the rest as not yet run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for path in (REPO / "docs/reproduction/runs").glob("*.json"):
        if "muon_wsd" not in path.name:  # Muon's runs missing: comparison 4 and the Muon sweep incomplete
            (runs / path.name).symlink_to(path)
    text = main(["--out", str(tmp_path), "--report_only"]).read_text()
    assert "| 4. LLaMA Muon vs MuonPower (wsd) | not yet run (3 of 6) |" in text
    assert "## 6. Which p" in text and "| MuonPower | short | 1 (Muon) | not yet run (0 of 3) |" in text
    assert "- **MuonPower, long regime (2000 steps)**: sweep not yet run" in text
    assert "## 8. LLaMA AdamW vs AdamPower, long regime (wsd)" in text and "## 9-17. p schedules" in text
    assert "11. LLaMA Muon vs MuonPower p auto (short, wsd): not yet run (3 of 6)" in text
    for word in ("issue", "session"):
        assert word not in text.lower()
    summary = json.loads((tmp_path / "summary.json").read_text())["which_p"]
    assert summary["regimes"]["long"]["epochs"] == pytest.approx(
        2000 * 8 * 128 / summary["regimes"]["long"]["train_split_tokens"]
    )
    assert not (tmp_path / "plan.json").exists()  # nothing planned, nothing trained


def _fake_cache(plan, runs: Path, loss_of) -> None:
    """Stored results for the suite's runs (those ``loss_of(spec)`` gives a loss for), shaped like real ones;
    filled to a fixed point, since the sweep's choice decides which validation runs the suite has."""
    runs.mkdir(parents=True, exist_ok=True)
    while True:
        new = [
            r
            for r in all_specs(plan, reproduce.cached(plan, runs))
            if not (runs / f"{r.key}.json").exists() and loss_of(r) is not None
        ]
        if not new:
            return
        for r in new:
            loss = loss_of(r)
            history = [
                {"loss": loss + 1, "step": 1},
                {"eval_loss": loss, "eval_runtime": 0.1, "step": r.steps},
                {"train_runtime": 1.0, "step": r.steps},
            ]
            result = {"spec": asdict(r), "key": r.key, "final_eval_loss": loss, "log_history": history}
            (runs / f"{r.key}.json").write_text(json.dumps(result))


def test_report_of_a_complete_smoke_cache(tmp_path):
    """Every section, the choice validated in every optimizer and regime, no run missing; with 1 fresh seed
    nothing is beyond noise, so the baseline is what the evidence supports."""
    plan = suite_plan(smoke=True, seeds=1)
    _fake_cache(plan, tmp_path / "runs", lambda r: 5.0 + abs((r.p or 1.0) - 0.9) + r.seed / 10)
    text = main(["--smoke", "--out", str(tmp_path), "--report_only"]).read_text()
    assert "not yet run" not in text and text.count("Use **p = 1** (plain ") == 4
    assert text.count("the sweep selects p = 0.9") == 4
    assert "| AdamPower | long | 0.9 (selected) |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())["which_p"]["studies"]
    assert all(s["validated"] and s["recommended_p"] == 1.0 for s in summary.values())
    assert (tmp_path / "p_sweep.png").stat().st_size > 1000


def test_the_suite_validates_the_choice_once_its_sweep_is_trained(tmp_path, capsys):
    """One sweep run is missing: the suite trains it, then (second pass) the validation of the p it makes the
    best, then writes the report. Real training of 3 smoke runs; every other run is a stored result."""
    plan = suite_plan(smoke=True, seeds=1)
    missing = p_run(plan, "adampower", 0.9, False, 0)
    validation = p_run(plan, "adampower", 0.9, False, 1)

    sweep_seed0 = {
        r.key
        for runs in p_runs(plan, "adampower", False, p_grid(plan, "adampower"), [0]).values()
        for r in runs
    }

    def loss_of(r):  # the rest of that sweep far worse than any trained run: p = 0.9 becomes the choice
        if r in (missing, validation):
            return None
        return 99.0 if r.key in sweep_seed0 else 5.0 + abs((r.p or 1.0) - 1.2)

    _fake_cache(plan, tmp_path / "runs", loss_of)
    assert not (tmp_path / "runs" / f"{validation.key}.json").exists()
    text = main(["--smoke", "--out", str(tmp_path)]).read_text()
    for r in (missing, validation):
        assert "summary" in json.loads((tmp_path / "runs" / f"{r.key}.json").read_text())  # really trained
    assert "**AdamPower, short regime (8 steps)**: the sweep selects p = 0.9" in text
    assert "not yet run" not in text
    printed = capsys.readouterr().out
    for r in (missing, validation):  # each trained run showed its evaluation while it ran
        stored = json.loads((tmp_path / "runs" / f"{r.key}.json").read_text())["log_history"]
        step, loss = next((row["step"], row["eval_loss"]) for row in stored if "eval_loss" in row)
        assert f"    {r.key}: step {step}/{r.steps}, eval {loss:.4f} (" in printed


def test_smoke_suite_and_resume(tmp_path):
    """The smoke suite end to end: every run stored (shaped like real results) except three that really train
    through the suite (p = auto in both regimes, which measure the noise, and MuonPower p = 1.2), then the
    report; a second call trains nothing; --report_only on an incomplete cache lists what has not run."""
    out = tmp_path / "repro"
    plan = suite_plan(smoke=True, seeds=1)

    def trained(r) -> bool:
        return r.p_spec == "auto" and r.optim == "adampower" or (
            r.optim == "muonpower" and r.p == 1.2 and r.steps == plan.steps and r.seed == 0
        )

    _fake_cache(plan, out / "runs", lambda r: None if trained(r) else 5.0 + abs((r.p or 1.0) - 0.9) + r.seed / 10)
    real = [r for r in all_specs(plan, reproduce.cached(plan, out / "runs")) if trained(r)]
    assert len(real) == 3 and not any((out / "runs" / f"{r.key}.json").exists() for r in real)
    report = main(["--smoke", "--out", str(out)])
    assert all("summary" in json.loads((out / "runs" / f"{r.key}.json").read_text()) for r in real)
    text = report.read_text()
    plan = suite_plan(smoke=True, seeds=1)
    for comp in comparisons(plan):
        assert any(line.startswith(f"| {comp['name']} |") for line in text.splitlines()), comp["name"]
    assert "## 6. Which p" in text and "## 7. Best p vs batch size" in text
    long = long_comparison(plan)
    assert f"## {long['name']}: 12 steps" in text
    assert any(line.startswith(f"| {long['name']} |") for line in text.splitlines())
    regimes = [line for line in text.splitlines() if line.startswith(("| short | 2.", "| long | 8."))]
    assert len(regimes) == 2 and all(line.endswith(" of 1 |") and "| AdamPower " in line for line in regimes)
    # which p: every optimizer and regime selected and validated on the fresh seed (seed 1)
    assert text.count("Use **p = ") == 4 and "not yet run" not in text
    results = reproduce.cached(plan, out / "runs")
    assert {r.key for r in all_specs(plan, results)} == set(results)
    assert all(study(plan, o, lg, results)["validated"] for o in P_GRID for lg in (0, 1))
    # comparisons 9-17: every variant in both regimes, a verdict per regime and the test per schedule
    for regime in ("short", "long"):
        assert f"- **{regime} regime**: auto vs AdamW" in text
        for variant in (
            "AdamW",
            "AdamPower p=1.2",
            "AdamPower p=linear:0.9:1.2",
            "AdamPower p=auto",
            "AdamPower p=linear:0.9:1.2:400",
            "AdamPower p=linear:1.0:1.2:400",
        ):
            assert any(line.startswith(f"| {regime} | {variant} |") for line in text.splitlines()), variant
    tests = [line for line in text.splitlines() if line.startswith("- Test (")]
    assert len(tests) == 4 and all(("**met**" in g) != ("not met: " in g) for g in tests)
    assert all(p.stat().st_size > 1000 for p in out.glob("*.png"))
    runs = sorted((out / "runs").glob("*.json"))
    auto = [p for p in runs if "adampower_wsd_pauto" in p.name]  # the two trained here
    assert auto and all(
        "noise/b_simple" in json.dumps(json.loads(p.read_text())["log_history"]) for p in auto
    )
    mtimes = {p: p.stat().st_mtime_ns for p in runs}

    main(["--smoke", "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in runs} == mtimes  # nothing retrained

    # a report from an incomplete cache lists what has not run instead of failing
    next(p for p in auto if "s12" in p.name).unlink()
    text = main(["--smoke", "--out", str(out), "--report_only"]).read_text()
    assert "13. LLaMA AdamW vs AdamPower p auto (long, wsd): not yet run (1 of 2)" in text
    assert not any(
        p.name.startswith("llama-tiny_adampower_wsd_pauto") and "s12" in p.name
        for p in (out / "runs").glob("*.json")
    )  # --report_only trained nothing
