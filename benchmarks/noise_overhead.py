"""Cost of the gradient noise meter per training step, on tiny LLaMA, meter on and off interleaved step by step.

    python -m benchmarks.noise_overhead [--steps 120] [--warmup 10] [--out benchmarks/results]

One process trains tiny LLaMA (``configs/models/llama-tiny``, AdamPower, global batch 8 = 2 micro-batches
of 4 sequences of 128 random tokens, the Trainer's loss scaling) in a plain loop, switching the meter on
and off every step: an "on" step has the per-parameter gradient hooks and ``measure()`` (what runs every
step). Interleaving step by step makes the drift of a shared machine hit both sides alike; pairs (on, off)
of adjacent steps give a ratio each. Reported: the median ratio - 1 and its interquartile range, beside the
median step times. What ``GradPowerTrainer`` adds at each logging step (``stats()`` and ``adam_snr``) is
timed on its own and reported per call and as a share of ``--logging_steps`` steps. Target: < 2%.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_gradpower as gp
from hf_gradpower.model_configs import load_model_config
from hf_gradpower.noise import GradientNoiseMeter, adam_snr

TARGET = 0.02
MICRO, ACCUM, SEQ = 4, 2, 128


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa() -> str:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown ISA"
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "x86-64")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="timed steps (half with the meter on)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--logging_steps", type=int, default=10, help="Trainer's logging interval, for the share")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 2:
        parser.error(f"--steps must be an even number >= 4 (got {args.steps})")
    torch.manual_seed(0)
    config = load_model_config("llama-tiny")
    model = AutoModelForCausalLM.from_config(config)
    optimizer = gp.build_optimizer(model, "adampower", lr=1e-3, weight_decay=0.1)
    meter = GradientNoiseMeter(optimizer.param_groups, micro_batch_size=MICRO)
    gen = torch.Generator().manual_seed(0)
    times: dict[bool, list[float]] = {True: [], False: []}
    log_times: list[float] = []
    for step in range(args.warmup + args.steps):
        on = step % 2 == 1
        ids = torch.randint(0, config.vocab_size, (ACCUM, MICRO, SEQ), generator=gen)
        t0 = time.perf_counter()
        if on:
            meter.start()
        for micro in ids:
            (model(input_ids=micro, labels=micro).loss / ACCUM).backward()
        if on:
            meter.measure()
            meter.stop()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times[on].append(time.perf_counter() - t0)
        if on:
            t1 = time.perf_counter()
            meter.stats()
            adam_snr(optimizer)
            log_times.append(time.perf_counter() - t1)
    # The meter's own work, timed alone on the last step's real gradients: what the hooks compute for
    # ACCUM micro-batches plus measure(); its share of the "off" step is free of the drift between steps.
    model(input_ids=ids[0], labels=ids[0]).loss.backward()
    hooks = [(meter._hook(gi, id(q)), q.grad) for gi, g in enumerate(optimizer.param_groups) for q in g["params"]
             if q.grad is not None]
    alone = []
    for _ in range(50):
        t0 = time.perf_counter()
        for _ in range(ACCUM):
            for hook, grad in hooks:
                hook(grad)
        meter.measure()
        alone.append(time.perf_counter() - t0)
    ratios = sorted(on / off for off, on in zip(times[False], times[True], strict=True))
    q = statistics.quantiles(ratios, n=4)
    result = {
        "cpu": cpu_name(), "isa": isa(), "threads": torch.get_num_threads(), "steps_each": len(times[True]),
        "median_off_s": statistics.median(times[False]), "median_on_s": statistics.median(times[True]),
        "median_overhead": statistics.median(ratios) - 1, "q1_overhead": q[0] - 1, "q3_overhead": q[2] - 1,
        "meter_alone_s": statistics.median(alone),
        "meter_alone_share": statistics.median(alone) / statistics.median(times[False]),
        "log_values_s": statistics.median(log_times),
        "log_share": statistics.median(log_times) / (args.logging_steps * statistics.median(times[False])),
        "logging_steps": args.logging_steps, "target": TARGET, "setup": f"tiny LLaMA, AdamPower, batch {MICRO * ACCUM} = {ACCUM} x {MICRO}, seq {SEQ}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"[noise_overhead] {result['cpu']} ({result['isa']}, {result['threads']} threads), {result['setup']}: "
          f"step {result['median_off_s'] * 1e3:.1f} ms off, {result['median_on_s'] * 1e3:.1f} ms on; overhead "
          f"median {result['median_overhead']:+.2%} (IQR {result['q1_overhead']:+.2%} .. "
          f"{result['q3_overhead']:+.2%}) over {result['steps_each']} interleaved pairs; the meter's work alone "
          f"{result['meter_alone_s'] * 1e3:.2f} ms = {result['meter_alone_share']:+.2%} of a step; logged values "
          f"{result['log_values_s'] * 1e3:.1f} ms per call = {result['log_share']:+.2%} at logging_steps "
          f"{args.logging_steps}; target < {TARGET:.0%}")
    return result


if __name__ == "__main__":
    main()
