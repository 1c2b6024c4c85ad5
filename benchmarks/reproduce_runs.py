"""Training one run of the reproduction suite (cached in ``<out>/runs/<key>.json``) and timing this machine."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.reproduce_plan import EVALS, LR, SEQ_LEN, Plan, RunSpec, Speed


def _argv(spec: RunSpec, plan: Plan, output_dir: Path) -> list[str]:
    settings = {
        "model_config": spec.model, "optim": spec.optim, "schedule": spec.schedule, "max_steps": spec.steps,
        "seq_len": SEQ_LEN, "global_batch_size": spec.batch, "per_device_train_batch_size": spec.batch,
        "per_device_eval_batch_size": 8, "learning_rate": LR, "seed": spec.seed, "data_seed": spec.seed,
        "eval_steps": max(1, spec.steps // (1 if plan.smoke else EVALS)), "save_strategy": "no",
        "logging_steps": spec.logging_steps, "eval_docs": plan.eval_docs, "max_eval_blocks": plan.max_eval_blocks,
        "disable_tqdm": "true", "output_dir": output_dir,
    }  # fmt: skip
    if spec.p is not None:
        settings["gradpower_p"] = spec.p
    if spec.p_spec is not None:
        settings["gradpower_p"] = spec.p_spec
    if spec.micro_batch is not None:
        settings["per_device_train_batch_size"] = spec.micro_batch
        settings["gradpower_noise"] = "true"
    if spec.blockwise:
        settings["blockwise_lr"] = "true"
    return [token for key, value in settings.items() for token in (f"--{key}", str(value))]


def _progress(key: str, stream, t0: float):
    """A Trainer callback that prints one line per evaluation to ``stream`` (the real stdout: the run's own
    output is captured), so a ten-minute run shows that it is alive and where its loss stands."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics:
                print(
                    f"    {key}: step {state.global_step}/{state.max_steps}, eval {metrics['eval_loss']:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    file=stream,
                    flush=True,
                )

    return Progress()


def execute(spec: RunSpec, plan: Plan, runs_dir: Path) -> tuple[dict, bool]:
    """(result, ran): the run's stored result, training it first unless ``runs_dir/<key>.json`` exists."""
    path = runs_dir / f"{spec.key}.json"
    if path.exists():
        return json.loads(path.read_text()), False
    from hf_gradpower.pretrain import run  # heavy import, only when something must be trained

    logging.getLogger("hf_gradpower").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="gp_reproduce_"))
    t0 = time.perf_counter()
    progress = _progress(spec.key, sys.stdout, t0)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            out = run(_argv(spec, plan, tmp / "run"), callbacks=[progress])
        wall = time.perf_counter() - t0
        history = json.loads((out / "metrics.json").read_text())
        summary = json.loads((out / "gradpower.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runtime = next(r["train_runtime"] for r in history if "train_runtime" in r)
    result = {
        "spec": asdict(spec),
        "key": spec.key,
        "wall_s": wall,
        "train_runtime": runtime,
        "s_per_step": runtime / spec.steps,
        "final_eval_loss": summary.get("final_eval_loss"),
        "final_train_loss": summary.get("final_train_loss"),
        "summary": summary,
        "log_history": history,
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(result, indent=1))
    os.replace(part, path)  # atomic: an interrupted run leaves no result file
    return result, True


def train_seconds_per_step(history: list[dict], steps: int) -> float:
    """Seconds per training step, evaluations excluded.

    Trainer's ``train_runtime`` includes the evaluations run during training; their ``eval_runtime`` rows
    are logged before the ``train_runtime`` row (a final ``evaluate()`` after training comes after it and
    is not part of ``train_runtime``). Works on any stored run: it only needs the log history.
    """
    evals = 0.0
    for row in history:
        if "train_runtime" in row:
            return (row["train_runtime"] - evals) / steps
        evals += row.get("eval_runtime", 0.0)
    raise ValueError("the log history has no train_runtime row")


def calibrate(smoke: bool, runs_dir: Path) -> Speed:
    """This machine's speed, from a short tiny-LLaMA AdamW run at batch 8 (for the time estimate only)."""
    steps = 4 if smoke else 20
    probe = Plan(smoke=True, seeds=1, steps=steps, eval_docs=10, max_eval_blocks=8)
    result, _ = execute(RunSpec(steps=steps, logging_steps=steps, seed=99), probe, runs_dir / "calibration")
    step_time = train_seconds_per_step(result["log_history"], steps)
    return Speed(step_time, max(0.5, result["wall_s"] - result["train_runtime"]))


def write_plan(plan: Plan, out: Path) -> None:
    """``<out>/plan.json``: the plan's definition alone, so it reads the same from every machine (the
    measured speed only feeds the printed estimate)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    part = path.with_suffix(f".json.{os.getpid()}")
    part.write_text(json.dumps(asdict(plan), indent=1))
    os.replace(part, path)  # atomic: parallel --only processes may write it at the same time


@functools.cache
def train_split_tokens(eval_docs: int, seed: int) -> int:
    """Tokens in the training split a run of the suite passes over (embedded C4 sample, ``eval_docs``
    documents held out by ``seed``, packed into blocks of ``SEQ_LEN``): the denominator of its epochs."""
    from hf_gradpower.data import build_datasets, count_tokens

    train, _ = build_datasets("embedded", "embedded", SEQ_LEN, eval_docs=eval_docs, seed=seed)
    return count_tokens(train)
