"""The probe: a few steps of a run_pretrain configuration -> measured noise, recommended p, JSON."""

from __future__ import annotations

import json
import math

import pytest

from hf_gradpower import probe
from hf_gradpower.p_theory import AUTO_RANGE, auto_power

TINY = ["--seq_len", "64", "--global_batch_size", "8", "--eval_docs", "20", "--disable_tqdm", "true"]


def test_probe_prints_a_recommendation_and_writes_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    result = probe.main(["--probe_steps", "6", "--probe_json", str(out), *TINY])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    # one process, no accumulation in the config: probed as 2 micro-batches of 4, same global batch
    assert (saved["batch_size"], saved["micro_batch_size"], saved["steps"]) == (8, 4, 6)
    assert math.isfinite(saved["b_simple"]) and saved["trace_cov"] > 0
    assert saved["b_simple"] == pytest.approx(saved["trace_cov"] / saved["grad_sq"], rel=1e-12)
    assert AUTO_RANGE[0] <= saved["recommended_p"] <= AUTO_RANGE[1]
    assert saved["recommended_p"] == auto_power(saved["grad_sq"], saved["trace_cov"],
                                                sum(g["numel"] for g in saved["groups"]), 8)
    assert saved["regime"] in ("signal-dominated", "noise-dominated")
    printed = capsys.readouterr().out
    assert "B_simple" in printed and f"recommended p = {saved['recommended_p']:g}" in printed


def test_probe_refuses_too_few_steps(tmp_path):
    with pytest.raises(SystemExit):
        probe.main(["--probe_steps", "1", "--probe_json", str(tmp_path / "p.json"), *TINY])
