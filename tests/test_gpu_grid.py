"""The GPU grid script: the commands it launches and the table it collects (no GPU needed)."""

from __future__ import annotations

import json

from benchmarks.gpu_grid import collect, main, markdown, paper_grid
from hf_gradpower.pretrain import parse_args


def test_grid_covers_the_paper_and_every_command_parses(tmp_path):
    runs = paper_grid()
    assert len(runs) == 5 * 2 * 2 + 2 + 3 * 2 + 2
    assert {r.model_config for r in runs if r.experiment == "qwen2moe-c4"} == {"qwen2moe-0.5b", "qwen2moe-1b",
                                                                               "qwen2moe-2b"}
    for run in runs:
        cmd = run.command(tmp_path)
        assert cmd[:3] == ["accelerate", "launch", "run_pretrain.py"]
        model_args, _, args, facts = parse_args(cmd[3:])  # what run_pretrain would do, minus the training
        assert (args.optim, model_args.schedule, facts["model_config"]) == (run.optim, run.schedule, run.model_config)


def test_interrupted_run_resumes(tmp_path):
    run = paper_grid()[0]
    (run.output_dir(tmp_path) / "checkpoint-100").mkdir(parents=True)
    assert run.command(tmp_path)[-2:] == ["--resume_from_checkpoint", "latest"]


def test_collect_pairs_baseline_and_gradpower(tmp_path):
    for run, loss in ((r, 3.30 if r.optim == "adamw" else 3.28) for r in paper_grid() if r.model_config == "llama-2b"):
        out = run.output_dir(tmp_path)
        out.mkdir(parents=True)
        (out / "gradpower.json").write_text(json.dumps({"final_eval_loss": loss, "parameters": 1_993_720_000}))
    rows = [r for r in collect(tmp_path) if r["model"] == "llama-2b"]
    assert len(rows) == 2 and all(abs(r["gain"] - 0.02) < 1e-9 for r in rows)
    assert "0.022" in rows[0]["paper"]
    table = markdown(collect(tmp_path))
    assert "| llama-c4 | llama-2b | cos | adamw | 3.3000 | adampower | 3.2800 | 0.0200 |" in table
    assert "not run" in table
    main(["collect", "--root", str(tmp_path), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "scaling.png").stat().st_size > 0
