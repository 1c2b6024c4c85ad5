"""Should this run use GradPower, and with which p? Measure before committing GPU hours.

    python -m hf_gradpower.probe [--probe_steps 30] [--probe_json probe.json] <run_pretrain.py arguments>

Trains ``--probe_steps`` steps of exactly the configuration ``run_pretrain.py`` would train (same model,
data, optimizer, global batch), measures the gradient noise scale ``B_simple`` (``hf_gradpower.noise``),
and prints one line: ``B_simple`` against the batch, the regime, and the p that Example 4.1 recommends
(``hf_gradpower.p_theory.auto_power``, per param group and overall); the same goes to a JSON file.

Measuring needs at least two micro-batches per step: a single-process run without gradient accumulation
is probed with the per-device batch halved (same global batch, so the same gradient). Early steps are
the least noisy part of training (the noise scale grows as the loss falls), so a short probe leans low.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from hf_gradpower.p_theory import AUTO_RANGE, EPS, auto_power
from hf_gradpower.trainer import GradPowerNoiseCallback

DEFAULT_PROBE_STEPS = 30


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--probe_steps", type=int, default=DEFAULT_PROBE_STEPS, help="steps to train and measure")
    parser.add_argument("--probe_json", type=Path, default=Path("probe.json"), help="where to write the result")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.probe_steps < 2:
        parser.error(f"--probe_steps must be >= 2 (got {own.probe_steps}): the noise needs a few steps")
    result = probe(rest, own.probe_steps)
    own.probe_json.parent.mkdir(parents=True, exist_ok=True)
    own.probe_json.write_text(json.dumps(result, indent=1))
    print(result["sentence"], flush=True)
    print(f"[probe] details: {own.probe_json}", flush=True)
    return result


def probe(train_argv: list[str], steps: int) -> dict:
    """Train ``steps`` steps of the ``run_pretrain`` configuration ``train_argv``; the measured noise and advice."""
    from hf_gradpower import pretrain

    train_argv = list(train_argv)
    _, _, args, facts = pretrain.parse_args(list(train_argv))  # checks the config before any training
    split = []
    if args.gradient_accumulation_steps * args.world_size == 1:
        batch = args.per_device_train_batch_size
        if batch < 2:
            raise ValueError("the noise needs >= 2 micro-batches per step, and a batch of 1 sequence cannot be "
                             "split: probe with --global_batch_size >= 2")
        micro = max(d for d in range(1, batch) if batch % d == 0)  # the same global batch, accumulated
        split = ["--per_device_train_batch_size", str(micro)]
    callback = GradPowerNoiseCallback(spec=None, measure_noise=True)
    tmp = Path(tempfile.mkdtemp(prefix="gp_probe_"))
    overrides = ["--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 10)), "--gradpower_noise", "true",
                 "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", str(max(1, steps // 10)),
                 "--report_to", "none", "--push_to_hub", "false", "--max_eval_blocks", "1",
                 "--output_dir", str(tmp / "run"), *split]
    try:
        pretrain.run(train_argv + overrides, callbacks=[callback])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return recommendation(callback, facts, str(args.optim), steps)


def recommendation(callback: GradPowerNoiseCallback, facts: dict, optim: str, steps: int) -> dict:
    """The probe's JSON: overall and per-group noise, recommended p and the regime sentence."""
    meter = callback.meter
    if meter is None or meter.steps == 0:
        raise RuntimeError("no gradient noise was measured (no step had >= 2 micro-batches)")
    total = meter.stats()
    batch = total["batch_size"]
    eps = EPS  # AdamW's default, and the recipes'
    groups = []
    for i in range(len(meter.groups)):
        s = meter.stats(i)
        groups.append({"group": i, "numel": s["numel"], "b_simple": s["b_simple"],
                       "recommended_p": auto_power(s["grad_sq"], s["trace_cov"], s["numel"], batch, eps)})
    p = auto_power(total["grad_sq"], total["trace_cov"], total["numel"], batch, eps)
    ratio = total["b_simple"] / batch
    if p > 1:
        regime, why = "noise-dominated", "Example 4.1's best p is above 1 (GradPower amplifies the consistent part)"
    else:
        regime, why = "signal-dominated", "Example 4.1's best p is at or below 1 (p > 1 would shrink the update)"
    sentence = (f"[probe] measured B_simple = {total['b_simple']:.3g} sequences vs your batch of {batch} "
                f"(noise/batch {ratio:.2f}) after {steps} steps: {regime}, {why}; recommended p = {p:g} "
                f"for this noise (clamped to {AUTO_RANGE[0]}-{AUTO_RANGE[1]}). The noise grows as training goes on, and "
                "in our CPU reproduction the p that won depended on the run's length (p = 1.2 lost to AdamW over "
                "the first ~300 steps and led from ~400 on): see README, Reproduction at CPU scale.")
    return {
        "model_config": facts.get("model_config"), "optim": optim, "steps": steps, "batch_size": batch,
        "micro_batch_size": meter.micro_batch_size, "b_simple": total["b_simple"], "grad_sq": total["grad_sq"],
        "trace_cov": total["trace_cov"], "noise_to_batch": ratio, "regime": regime, "recommended_p": p,
        "p_range": list(AUTO_RANGE), "groups": groups, "sentence": sentence,
    }


def cli() -> int:
    """The ``hf-gradpower-probe`` command: ``main`` with an exit status."""
    main()
    return 0


if __name__ == "__main__":
    main()
