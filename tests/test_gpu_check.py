"""benchmarks.gpu_check's CPU path: the same checks on tiny sizes, and a report that says what it measured."""

from __future__ import annotations

import json

from benchmarks.gpu_check import main


def test_cpu_path_writes_a_report_with_every_section(tmp_path):
    result = main(["--device", "cpu", "--size", "small", "--out", str(tmp_path)])
    report = (tmp_path / "gpu_check_cpu.md").read_text()
    stored = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert "No GPU figure" in report and "all checks pass" in report
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
