"""The CPU reproduction suite: summary arithmetic, spike counting, and the --smoke suite end to end (resumable)."""

from __future__ import annotations

import math
import time

import pytest

from benchmarks.reproduce import Plan, comparisons, count_spikes, main, summarize_pair


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


def test_smoke_suite_and_resume(tmp_path):
    out = tmp_path / "repro"
    t0 = time.perf_counter()
    report = main(["--smoke", "--out", str(out)])
    first = time.perf_counter() - t0
    assert first < 120, f"smoke suite took {first:.0f} s"
    text = report.read_text()
    for comp in comparisons(Plan(True, 1, 8, 0.1, 1.0, 10, 8)):
        assert any(line.startswith(f"| {comp['name']} |") for line in text.splitlines()), comp["name"]
    assert "## 6. p sweep" in text and "## 7. Best p vs batch size" in text
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 7  # 5 comparisons + p sweep + best p vs batch
    assert all(p.stat().st_size > 1000 for p in pngs)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 24
    mtimes = {p: p.stat().st_mtime_ns for p in runs}

    t0 = time.perf_counter()
    main(["--smoke", "--out", str(out)])
    second = time.perf_counter() - t0
    assert {p: p.stat().st_mtime_ns for p in runs} == mtimes  # nothing retrained
    assert second < first / 3
