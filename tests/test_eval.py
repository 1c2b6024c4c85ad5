"""run_eval.py / hf_gradpower.evaluation on tiny checkpoints and local lm-eval task fixtures (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_gradpower import evaluation
from hf_gradpower.data import load_tokenizer

TASKS = list(evaluation.EXAMPLE_TASKS)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def make_checkpoint(path: Path, seed: int, info: dict | None) -> Path:
    tok = load_tokenizer("embedded")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256,
    ))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if info is not None:
        (path / "gradpower.json").write_text(json.dumps(info))
    (path / "README.md").write_text("# tiny run\n\nSome card text.\n\n## Training\n\nloss went down\n")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return [
        make_checkpoint(root / "base", 0, {"optim": "adamw", "gradpower_p": None}),
        make_checkpoint(root / "power", 1, {"optim": "adampower", "gradpower_p": 1.2}),
    ]


@pytest.fixture(scope="module")
def evaluated(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_results")
    return evaluation.run([str(c) for c in checkpoints], tasks=",".join(TASKS),
                          batch_size=4, device="cpu", dtype="auto", output_dir=out, quiet=True), out


def test_numbers_equal_direct_lm_eval(evaluated, checkpoints):
    import lm_eval

    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoints[0]},dtype=float32", tasks=TASKS,
        task_manager=evaluation.task_manager(), num_fewshot=0, batch_size=4, device="cpu",
        log_samples=False,
    )["results"]
    table = evaluated[0]["table"]
    for row, task in zip(table["rows"], TASKS, strict=False):
        assert row["task"] == task
        assert row["cells"][0]["value"] == direct[task]["acc,none"]
        assert row["cells"][0]["stderr"] == direct[task]["acc_stderr,none"]


def test_table_layout_and_files(evaluated):
    result, out = evaluated
    table = result["table"]
    assert table["labels"] == ["AdamW", "AdamPower(p=1.2)"]
    assert [r["task"] for r in table["rows"]] == [*TASKS, "Average"]
    per_task = table["rows"][:-1]
    for i in range(2):
        vals = [r["cells"][i]["value"] for r in per_task]
        assert table["rows"][-1]["cells"][i]["value"] == pytest.approx(sum(vals) / len(vals))
    for row in table["rows"]:
        assert row["gain"][0] == pytest.approx(row["cells"][1]["value"] - row["cells"][0]["value"])
        lm = result["results"][0]["results"].get(row["task"])
        if lm is not None:
            assert row["cells"][0]["value"] == lm["acc,none"]
    md = (out / "zero_shot.md").read_text()
    assert md.splitlines()[0] == "| Dataset | Metric | AdamW | AdamPower(p=1.2) | Gain |"
    first = table["rows"][0]["cells"][0]
    assert f"{100 * first['value']:.2f} ± {100 * first['stderr']:.2f}" in md.splitlines()[2]
    assert (out / "zero_shot.csv").read_text().startswith("dataset,metric,AdamW,AdamW stderr,")
    assert json.loads((out / "zero_shot.json").read_text())["labels"] == table["labels"]
    full = sorted(out.glob("lm_eval_*.json"))
    assert len(full) == 2 and "arc_tiny" in json.loads(full[0].read_text())["results"]
    text = evaluation.to_text(table)
    assert "AdamPower(p=1.2)" in text and "Average" in text


def test_acc_norm_metric(evaluated, checkpoints):
    result = evaluated[0]
    ckpts = [evaluation.read_checkpoint(c) for c in checkpoints]
    table = evaluation.build_table(ckpts, result["results"], TASKS, metric="acc_norm")
    assert table["rows"][1]["cells"][0]["value"] == result["results"][0]["results"]["hellaswag_tiny"]["acc_norm,none"]


def test_model_card_appended_once_then_replaced(evaluated, checkpoints, tmp_path):
    table = evaluated[0]["table"]
    ckpt = tmp_path / "card"
    ckpt.mkdir()
    readme = ckpt / "README.md"
    readme.write_text((checkpoints[0] / "README.md").read_text())
    evaluation.update_model_card(ckpt, evaluation.card_section(table))
    text1 = readme.read_text()
    assert text1.count(evaluation.CARD_SECTION) == 1 and "## Training" in text1 and "| Average |" in text1
    evaluation.update_model_card(ckpt, evaluation.card_section(table))
    assert readme.read_text() == text1
    evaluation.update_model_card(ckpt, evaluation.CARD_SECTION + "\n\nnew table\n")
    text3 = readme.read_text()
    assert text3.count(evaluation.CARD_SECTION) == 1 and "new table" in text3 and "| Average |" not in text3
    assert text3.startswith("# tiny run") and "loss went down" in text3


def test_update_card_and_push_to_hub(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []  # only the network call is mocked
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kw: calls.append(kw))
    ckpts = []
    for c in checkpoints:  # copies, so the module's checkpoints keep their cards
        dst = tmp_path / c.name
        dst.mkdir()
        for f in c.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        ckpts.append(dst)
    res = evaluation.run([str(c) for c in ckpts], tasks=TASKS, output_dir=tmp_path / "o",
                         batch_size=4, device="cpu", push_to_hub=True, hub_model_id="me/base,me/power", quiet=True)
    assert [c["repo_id"] for c in calls] == ["me/base", "me/power"]
    assert all(c["path_in_repo"] == "README.md" for c in calls)
    for call, ckpt in zip(calls, ckpts, strict=True):
        assert Path(call["path_or_fileobj"]) == ckpt / "README.md"
        assert evaluation.CARD_SECTION in (ckpt / "README.md").read_text()
    assert res["readmes"] == [c / "README.md" for c in ckpts]


@pytest.fixture
def no_model(monkeypatch):
    import lm_eval

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", boom)
    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)


def test_bad_inputs_fail_before_loading(no_model, checkpoints, tmp_path, monkeypatch):
    ok = str(checkpoints[0])
    with pytest.raises(ValueError, match="does not exist"):
        evaluation.run([str(tmp_path / "nope")], tasks=TASKS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a model checkpoint"):
        evaluation.run([str(tmp_path / "empty")], tasks=TASKS)
    with pytest.raises(ValueError, match="unknown lm-eval task.*arc_tinyy.*--include_path"):
        evaluation.run([ok], tasks="arc_tinyy")
    with pytest.raises(ValueError, match="--include_path"):
        evaluation.run([ok], tasks=TASKS, include_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="hub_model_id"):
        evaluation.run([ok], tasks=TASKS, push_to_hub=True)
    with pytest.raises(ValueError, match="--metric"):
        evaluation.run([ok], tasks=TASKS, metric="f1")
    # offline and the Hub dataset of arc_easy not in (an empty) cache
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")
    with pytest.raises(ValueError, match="allenai/ai2_arc.*not in the local"):
        evaluation.run([ok], tasks="arc_challenge")


def test_cli_reports_error(no_model, tmp_path, capsys):
    import run_eval

    assert run_eval.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("run_eval.py: error: checkpoint folder") and err.count("\n") == 1


def test_two_processes_with_accelerate_launch_give_the_same_table(evaluated, checkpoints, tmp_path):
    """lm-eval's data-parallel mode: `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
           str(repo / "run_eval.py"), str(checkpoints[0]), str(checkpoints[1]), "--tasks", ",".join(TASKS),
           "--batch_size", "4", "--device", "cpu", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "zero_shot.json").read_text())
    one = json.loads((evaluated[1] / "zero_shot.json").read_text())
    assert two == one


def test_limit_passes_through_to_lm_eval(checkpoints, tmp_path):
    import lm_eval

    ours = evaluation.run([str(checkpoints[1])], tasks="arc_tiny", limit=3, batch_size=4,
                          device="cpu", output_dir=tmp_path, quiet=True)
    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoints[1]},dtype=float32", tasks=["arc_tiny"], limit=3,
        task_manager=evaluation.task_manager(), batch_size=4, device="cpu", log_samples=False,
    )
    assert direct["n-samples"]["arc_tiny"]["effective"] == 3
    assert ours["table"]["rows"][0]["cells"][0]["value"] == direct["results"]["arc_tiny"]["acc,none"]


@pytest.mark.parametrize("limit", ["-1", "0", "1.5"])
def test_cli_bad_limit_is_one_line_before_any_model(no_model, checkpoints, capsys, limit):
    import run_eval

    assert run_eval.main([str(checkpoints[0]), "--tasks", "arc_tiny", "--limit", limit]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run_eval.py: error: --limit {float(limit):g}:") and "positive number" in err
    assert err.count("\n") == 1


def test_cli_argparse_errors_are_one_line(capsys):
    import run_eval

    with pytest.raises(SystemExit) as exit_:
        run_eval.main(["ckpt", "--limit", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("run_eval.py: error: argument --limit") and err.count("\n") == 1


def _lm_eval_results(per_task: dict[str, dict[str, float]]) -> dict:
    """lm-eval's results layout ({"results": {task: {"acc,none": v, "acc_stderr,none": se}}}) for given numbers."""
    return {"results": {task: {f"{k},none": v for k, v in metrics.items()} for task, metrics in per_task.items()}}


def test_acc_norm_falls_back_to_acc_where_a_task_has_none(checkpoints):
    ckpts = [evaluation.read_checkpoint(c) for c in checkpoints]
    results = [
        _lm_eval_results({"hellaswag": {"acc": 0.30, "acc_norm": 0.40, "acc_norm_stderr": 0.01},
                          "winogrande": {"acc": 0.50, "acc_stderr": 0.02}}),
        _lm_eval_results({"hellaswag": {"acc": 0.31, "acc_norm": 0.44, "acc_norm_stderr": 0.01},
                          "winogrande": {"acc": 0.54, "acc_stderr": 0.02}}),
    ]
    table = evaluation.build_table(ckpts, results, ["hellaswag", "winogrande"], metric="acc_norm")
    hella, wino, avg = table["rows"]
    assert (hella["metric"], wino["metric"], avg["metric"]) == ("acc_norm", "acc*", "acc_norm*")
    assert [c["value"] for c in wino["cells"]] == [0.50, 0.54] and wino["cells"][0]["stderr"] == 0.02
    assert [c["value"] for c in avg["cells"]] == pytest.approx([(0.40 + 0.50) / 2, (0.44 + 0.54) / 2])
    assert avg["gain"][0] == pytest.approx(0.04)
    text = evaluation.to_text(table)
    assert text.rstrip().endswith("* acc: the task reports no acc_norm") and "n/a" not in text
    assert "\\* acc: the task reports no acc_norm" in evaluation.to_markdown(table)
    plain = evaluation.build_table(ckpts, results, ["hellaswag", "winogrande"], metric="acc")
    assert plain["footnote"] is None and [r["metric"] for r in plain["rows"]] == ["acc", "acc", "acc"]
