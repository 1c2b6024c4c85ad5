"""AdamPower under DeepSpeed ZeRO-1/2 for real: 2 gloo processes on DeepSpeed's CPU accelerator.

Needs the optional ``deepspeed`` extra (``pip install -e .[deepspeed]``); skipped without it. Trainer
cannot run DeepSpeed on a CPU (Accelerate selects it only off CPU), so this drives ``deepspeed.initialize``
directly with the registry's AdamPower as the client optimizer. Tolerance: losses within 1e-5 relative of
one process clipping then applying AdamPower on the whole batch (measured 1.2e-7); plain AdamW differs by
~4e-4, so phi before the gradient reduction or a skipped phi would fail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_adampower_after_clip_on_zero_partitions_equals_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "results.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DEEPSPEED_RESULTS": str(out), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(TESTS / "deepspeed_worker.py")]
    proc = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["baseline_rel"] > 1e-4  # AdamW and AdamPower are far apart at this tolerance
    for stage in (1, 2):
        r = results[f"zero{stage}"]
        assert r["loss_rel"] < 1e-5, (stage, r)
        # AdamPower stepped on DeepSpeed's flat fp32 partitions: 1-D, together half of the model per rank
        assert all(ndim == 1 and dtype == "torch.float32" for ndim, dtype, _ in r["seen"])
        assert sum(n for *_, n in r["seen"]) == results["model_numel"] // results["world"]
