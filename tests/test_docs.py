"""Docs that cannot rot: links resolve, Python snippets run, the README's commands run (reduced steps).

A fenced block whose first line is ``# needs ...`` (a GPU, torchrun, trl) runs only where that is available;
a shell command whose comment says ``needs`` (GPUs, the Hub) is not run here. Python snippets of one page run
in order in one namespace, like a reader going down the page, given a tiny causal LM ``model``, a dataset of
token blocks ``train_ds`` and a batch of token ids ``batch``.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import patterned_tokens, tiny_llama
from datasets import Dataset

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, REPO / "examples" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_LIMIT = 12_000

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
REQUIREMENTS = {  # the markers a snippet may carry, and whether this machine has what they name
    "# needs a CUDA GPU": torch.cuda.is_available,
    "# needs torchrun": lambda: False,  # several processes: the distributed tests run these paths
    "# needs trl": lambda: importlib.util.find_spec("trl") is not None,
}
# README commands, run in-process with their own flags for a few seconds of work (later flags win)
TINY_RUN = shlex.split(
    "--max_steps 2 --seq_len 32 --global_batch_size 4 --eval_docs 10 --max_eval_blocks 2 --eval_steps 2 "
    "--save_steps 2 --disable_tqdm true"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _blocks(path: Path, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in languages]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_a_landing_page():
    assert len(README.read_text()) <= README_LIMIT


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{_rel(page)}: links that lead nowhere: {broken}"


@pytest.fixture
def reader_namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write their outputs ("out", ...) here
    blocks = patterned_tokens(16, 16)
    return {
        "model": tiny_llama(),
        "batch": blocks[:4].clone(),
        "train_ds": Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()}),
    }


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=_rel)
def test_python_snippets_run(page, reader_namespace):
    for i, code in enumerate(_blocks(page, "python")):
        first = code.splitlines()[0].strip()
        if first.startswith("# needs"):
            marker = next((m for m in REQUIREMENTS if first.startswith(m)), None)
            assert marker, f"{_rel(page)} snippet {i}: unknown marker {first!r}; known: {list(REQUIREMENTS)}"
            if not REQUIREMENTS[marker]():
                continue
        try:
            exec(compile(code, f"{_rel(page)}[snippet {i}]", "exec"), reader_namespace)
        except Exception as exc:
            raise AssertionError(f"{_rel(page)} snippet {i} fails:\n{code}") from exc


def _readme_commands() -> list[list[str]]:
    """Each command line of the README's shell blocks, minus those marked as needing what CI lacks."""
    commands = []
    for block in _blocks(README, "bash"):
        for line in block.splitlines():
            code, _, comment = line.partition(" #")
            if not code.strip() or "needs" in comment:
                continue
            commands.append(shlex.split(code))
    return commands


def _entry(argv: list[str]):
    """The function a README command runs, and its arguments."""
    from hf_gradpower import evaluation, pretrain, probe

    for prefix, run, extra in (
        (["python", "run_pretrain.py"], pretrain.main, TINY_RUN),
        (["hf-gradpower-pretrain"], pretrain.main, TINY_RUN),
        (["python", "run_eval.py"], evaluation.main, ["--limit", "2", "--batch_size", "2"]),
        (["python", "-m", "hf_gradpower.probe"], probe.main, ["--probe_steps", "2", *TINY_RUN]),
    ):
        if argv[: len(prefix)] == prefix:
            return lambda: run(argv[len(prefix) :] + extra)
    return None


def test_readme_commands_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ and eval_results/ land here, as in a user's folder
    skipped = {"pip install": "installs (CI's own steps)", "python -m pytest": "the test suite itself"}
    ran = []
    for argv in _readme_commands():
        line = " ".join(argv)
        if any(line.startswith(s) for s in skipped):
            continue
        run = _entry(argv)
        assert run is not None, f"README command {line!r}: mark it '# needs ...' or teach this test to run it"
        result = run()
        assert result in (0, None) or isinstance(result, dict), f"{line!r} exited with {result}"
        ran.append(line)
    assert any("run_pretrain" in c for c in ran) and any("run_eval" in c for c in ran), ran
    assert (tmp_path / "outputs" / "llama-tiny-adampower-cos" / "README.md").exists()


def test_readme_names_the_installed_commands_and_the_ci_command():
    text = README.read_text()
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = re.findall(r"^([\w-]+) = ", section, re.M)  # (tomllib is Python 3.11+)
    assert scripts
    assert [name for name in scripts if name not in text] == []
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "python -m pytest -q tests"
    assert any(ci in block.splitlines() for block in _blocks(README, "bash"))


def test_readme_results_quote_the_reproduction_summary():
    """The README's two regimes carry the figures of the shipped report's summary, as rounded there."""
    import json

    text = README.read_text()
    summary = json.loads((REPO / "docs" / "reproduction" / "summary.json").read_text())
    for r in summary["two_regimes"]:
        quoted = [
            f"{r['steps']} steps",
            f"{r['baseline_mean']:.3f} ± {r['baseline_std']:.3f}",
            f"{r['gradpower_mean']:.3f} ± {r['gradpower_std']:.3f}",
            f"**{r['diff']:+.3f}**",
            f"2 x SE {2 * r['diff_se']:.3f}",
        ]
        assert [q for q in quoted if q not in text] == [], r["regime"]
    long = max(summary["two_regimes"], key=lambda r: r["steps"])
    assert (
        f"{long['epochs']:.1f} epochs" in text and "{} of {} evaluations".format(*long["evals_lower"]) in text
    )


def test_readme_results_quote_every_validated_choice_of_p():
    """Each optimizer and regime whose choice of p was validated on fresh seeds is in the README's results with the
    report's own basis sentence."""
    import json

    text = README.read_text()
    studies = json.loads((REPO / "docs" / "reproduction" / "summary.json").read_text())["which_p"]["studies"]
    validated = [s for s in studies.values() if s["validated"]]
    assert validated, "the shipped report validates no choice of p"
    assert [s["basis"] for s in validated if s["basis"] not in text] == []
