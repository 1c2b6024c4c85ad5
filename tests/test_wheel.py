"""The wheel: every package file ships in it, and an install of it works from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hf_gradpower"
COMMANDS = ("hf-gradpower-eval", "hf-gradpower-gpu-check", "hf-gradpower-pretrain", "hf-gradpower-probe")  # the README names them

CHECK = """
import json, sys
from importlib.metadata import distribution
from pathlib import Path
import hf_gradpower
from hf_gradpower.data import load_tokenizer, validate_data_source
from hf_gradpower.evaluation import EXAMPLE_TASKS, example_task_dir
from hf_gradpower.model_configs import available_model_configs, count_parameters, load_model_config
configs = {name: count_parameters(load_model_config(name))["total"] for name in ("llama-tiny", "llama-0.2b", "qwen2moe-1b")}
print(json.dumps({
    "package": hf_gradpower.__file__, "configs": configs, "names": available_model_configs(),
    "tokenizer": len(load_tokenizer("embedded")), "corpus": validate_data_source("embedded").files[0],
    "tasks": sorted(p.stem for p in Path(example_task_dir()).glob("*.yaml")),
    "commands": {e.name: callable(e.load()) for e in distribution("hf-gradpower").entry_points
                 if e.group == "console_scripts"},
}))
"""


def _package_files() -> set[str]:
    return {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_wheel_ships_every_package_file_and_works_from_another_directory(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "hf_gradpower", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("hf_gradpower-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _package_files() <= names, sorted(_package_files() - names)
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_GRADPOWER_MODEL_CONFIGS", None)
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(site))  # the installed copy, not the checkout
    assert got["corpus"].startswith(str(site))
    assert got["configs"]["llama-tiny"] == 2_098_304
    assert abs(got["configs"]["llama-0.2b"] / 200e6 - 1) < 0.01 and abs(got["configs"]["qwen2moe-1b"] / 1040e6 - 1) < 0.01
    assert set(got["names"]) == {p.stem for p in (PACKAGE / "resources" / "model_configs").glob("*.json")}
    assert got["tokenizer"] == 4096 and got["tasks"] == sorted(["arc_tiny", "hellaswag_tiny", "piqa_tiny"])
    assert got["commands"] == dict.fromkeys(COMMANDS, True)  # each resolves to a function in the installed package

    # the evaluation command runs from the installed scripts and answers bad input with one error line
    proc = subprocess.run([str(site / "bin" / "hf-gradpower-eval"), "no_such_checkpoint"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith("run_eval.py: error: checkpoint folder"), proc.stderr
