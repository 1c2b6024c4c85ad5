"""The probe: a few steps of a run_pretrain configuration -> measured noise, the recommended p from the
nearest measured evidence, JSON; the rule that picks the evidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_gradpower import probe
from hf_gradpower.p_theory import AUTO_RANGE, auto_power
from hf_gradpower.probe import PAPER, Evidence, load_evidence, recommend, recommendation_for

TINY = ["--seq_len", "64", "--global_batch_size", "8", "--eval_docs", "20", "--disable_tqdm", "true"]
REPO = Path(__file__).resolve().parent.parent


def _ours(optim: str, regime: str, tokens_per_param: float, p: float, validated: bool = True) -> Evidence:
    return Evidence(
        "ours", optim, regime, f"our {regime} runs", tokens_per_param, 1024, p, validated, f"{regime} basis"
    )


EVIDENCE = [
    _ours("adampower", "short", 0.11, 1.0),
    _ours("adampower", "long", 0.98, 1.2),
    _ours("muonpower", "short", 0.11, 0.9),
    *PAPER,
]


@pytest.mark.parametrize(
    ("optim", "tokens_per_param", "batch_tokens", "p", "regime", "covered"),
    [
        ("adamw", 0.1, 1024, 1.0, "short", True),  # our short regime: the baseline won
        ("adampower", 0.29, 2048, 1.0, "short", True),  # the quick start: nearer the short regime
        ("adamw", 0.5, 1024, 1.2, "long", True),  # nearer the long regime (log scale)
        ("adamw_torch_fused", 2.0, 1024, 1.2, "long", True),  # transformers' AdamW: the same family
        ("muon", 0.11, 1024, 0.9, "short", True),  # Muon uses Muon's evidence only
        ("muonpower", 1.0, 1024, 0.9, "short", False),  # nearest is 9x away: outside everything measured
        ("adamw", 20.0, 512 * 256, 1.2, "paper", True),  # the paper's C4 setting
        ("adamw", 20.0, 2048, 1.2, "long", False),  # long run, tiny batch: nothing measured near
        ("adamw", 500.0, 512 * 256, 1.2, "paper", False),  # far beyond the paper's length
    ],
)
def test_the_rule_picks_the_nearest_measured_regime(
    optim, tokens_per_param, batch_tokens, p, regime, covered
):
    rec = recommend(optim, tokens_per_param, batch_tokens, EVIDENCE)
    assert (rec.p, rec.evidence.regime, rec.covered) == (p, regime, covered)
    assert f"recommended p = {p:g}" in rec.headline and rec.evidence.basis in rec.headline
    assert ("outside everything measured" in rec.headline) is not covered
    if p == 1.0:
        assert "no GradPower" in rec.headline and rec.flags == "--optim " + (
            "muon" if "muon" in optim else "adamw"
        )
    else:
        assert rec.flags.endswith(f"--gradpower_p {p:g}")


def test_no_evidence_for_other_optimizers():
    rec = recommend("sgd", 1.0, 1024, EVIDENCE)
    assert rec.p is None and rec.evidence is None and "measured with AdamW and Muon only" in rec.headline


def test_shipped_evidence_never_rests_on_an_unvalidated_sweep():
    """The package's table loads without docs/; until a regime is validated on fresh seeds its p is 1.2 or the
    baseline (from p = 1.2 vs the baseline over paired seeds), never a sweep's unvalidated best."""
    evidence = load_evidence()
    ours = [e for e in evidence if e.source == "ours"]
    assert ours and evidence[len(ours) :] == list(PAPER)
    assert all(e.validated or e.p in (1.0, 1.2) for e in ours)
    assert {e.optimizer for e in ours} <= {"adampower", "muonpower"}


def test_readme_quotes_the_probe_for_the_quick_start():
    """The README's line for the quick-start configuration is the probe's own (written from this function)."""
    assert recommendation_for([]).headline in (REPO / "README.md").read_text()


def test_probe_prints_the_noise_and_the_recommendation_and_writes_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    result = probe.main(["--probe_steps", "6", "--probe_json", str(out), *TINY])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    # one process, no accumulation in the config: probed as 2 micro-batches of 4, same global batch
    assert (saved["batch_size"], saved["micro_batch_size"], saved["steps"]) == (8, 4, 6)
    assert math.isfinite(saved["b_simple"]) and saved["trace_cov"] > 0
    assert saved["b_simple"] == pytest.approx(saved["trace_cov"] / saved["grad_sq"], rel=1e-12)
    assert AUTO_RANGE[0] <= saved["noise_p"] <= AUTO_RANGE[1]
    assert saved["noise_p"] == auto_power(
        saved["grad_sq"], saved["trace_cov"], sum(g["numel"] for g in saved["groups"]), 8
    )
    assert saved["regime"] in ("signal-dominated", "noise-dominated")
    expected = recommendation_for(TINY)  # 300 steps x 8 x 64 tokens of tiny LLaMA: the run, not the probe
    assert saved["recommended_p"] == expected.p
    assert saved["recommendation"]["tokens_per_param"] == pytest.approx(300 * 8 * 64 / 2_098_304)
    printed = capsys.readouterr().out
    assert "B_simple" in printed and f"[probe] {expected.headline}" in printed


def test_probe_refuses_too_few_steps(tmp_path):
    with pytest.raises(SystemExit):
        probe.main(["--probe_steps", "1", "--probe_json", str(tmp_path / "p.json"), *TINY])
