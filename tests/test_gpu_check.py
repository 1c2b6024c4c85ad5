"""The first-contact check (hf_gradpower.gpu_check) and benchmarks.gpu_check on CPU: the same checks on tiny
sizes, and reports that say what ran."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu_check import main
from hf_gradpower import gpu_check
from hf_gradpower.kernels import cpu


def test_first_contact_quick_mode_passes_on_cpu_and_names_each_backend(capsys):
    """Self-checks of every dtype combination, then Trainer steps of AdamPower, MuonPower and attach(AdamW)."""
    assert gpu_check.main(["--quick", "--device", "cpu", "--steps", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == len(gpu_check.COMBOS) + 3 and all(ln.startswith("PASS") for ln in lines)
    fast = cpu.kernel_info()["impl"] if cpu.fast_kernel_available() else "eager"
    for name in ("AdamPower", "MuonPower", "attach(AdamW)"):
        line = next(ln for ln in lines if f"trainer {name} " in ln)
        assert fast in line and "steps counted [2]" in line


def test_first_contact_self_check_reports_a_failing_kernel(monkeypatch):
    """A C kernel whose phi is slightly wrong: its self-check lines FAIL and name the backend and the reason."""
    if not cpu.fast_kernel_available():
        return
    real = cpu.CpuKernel.sign_power_many
    monkeypatch.setattr(cpu.CpuKernel, "sign_power_many", lambda self, xs, p, n, **kw: real(self, xs, p * 1.0001, n, **kw))
    checks = gpu_check.self_checks(torch.device("cpu"))
    phi = next(c for c in checks if c.name == "self-check phi float32")
    assert not phi.passed and phi.backend == "c" and "ulp from float64" in phi.detail


def test_cpu_path_writes_a_report_with_every_section(tmp_path):
    result = main(["--device", "cpu", "--size", "small", "--out", str(tmp_path)])
    report = (tmp_path / "gpu_check_cpu.md").read_text()
    stored = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert "No GPU figure" in report and "all checks pass" in report
    assert "## First contact" in report and "PASS  trainer attach(AdamW)" in report
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"| phi, {dtype} gradients |" in report
    for row in ("AdamPower step, float32 params", "MuonPower momentum", "GradScaler", "| adampower |", "| muonpower |"):
        assert row in report
    checks = stored["correctness"]
    assert len(checks) == 9 and all(c["error"] <= c["bound"] for c in checks)
    assert set(stored["step"]["ratio"]) == {"adampower", "muonpower"}
    assert stored["step"]["parameters"] == result["step"]["parameters"] > 0
    assert all(o["tokens_per_s"] > 0 for o in stored["trainer"]["optimizers"].values())
    assert f"**{stored['trainer']['ratio']:.3f}**" in report
