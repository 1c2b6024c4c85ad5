"""Cost of the gradient noise meter per training step, on tiny LLaMA, meter on and off interleaved step by step.

    python -m benchmarks.noise_overhead [--blocks 40] [--block_steps 8] [--every 4] [--warmup 10] [--out benchmarks/results]

One process trains tiny LLaMA (``configs/models/llama-tiny``, AdamPower, global batch 8 = 2 micro-batches
of 4 sequences of 128 random tokens, the Trainer's loss scaling) in a plain loop, in alternating blocks of
``--block_steps`` steps with the meter off and on. An "on" block does what ``GradPowerTrainer`` does: every
``--every``-th step (default: its ``gradpower_noise_every``, 4) has the per-parameter gradient hooks and
``measure()``; the hooks are added and removed at the steps' beginning, inside the timing. Alternating blocks makes the drift of a shared machine hit both sides alike; each
adjacent pair of blocks (off-on, then on-off, alternating) gives the ratio of their mean step times.
Reported: the median ratio - 1 with its interquartile range and the mean with 2 standard errors over the
pairs, beside the median step times. What ``GradPowerTrainer`` adds at each logging step (``stats()`` and ``adam_snr``) is
timed on its own and reported per call and as a share of ``--logging_steps`` steps. Target: < 2%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_gradpower as gp
from hf_gradpower.model_configs import load_model_config
from hf_gradpower.noise import DEFAULT_NOISE_EVERY, GradientNoiseMeter, adam_snr

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
    parser.add_argument("--blocks", type=int, default=40, help="pairs of (off, on) blocks")
    parser.add_argument("--block_steps", type=int, default=8, help="timed steps per block (a multiple of --every)")
    parser.add_argument("--every", type=int, default=DEFAULT_NOISE_EVERY,
                        help="measure every N-th step of an 'on' block, as GradPowerTrainer's gradpower_noise_every")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the process's CPU time (time a shared VM's other guests take is not counted)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--logging_steps", type=int, default=10, help="Trainer's logging interval, for the share")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1 (got {args.every})")
    if args.blocks < 2 or args.block_steps < 3:
        parser.error(f"need --blocks >= 2 and --block_steps >= 3 (got {args.blocks}, {args.block_steps})")
    torch.manual_seed(0)
    config = load_model_config("llama-tiny")
    model = AutoModelForCausalLM.from_config(config)
    optimizer = gp.build_optimizer(model, "adampower", lr=1e-3, weight_decay=0.1)
    meter = GradientNoiseMeter(optimizer.param_groups, micro_batch_size=MICRO)
    gen = torch.Generator().manual_seed(0)

    on_steps = itertools.count()  # index of each step taken with the meter on

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(on: bool) -> float:
        ids = torch.randint(0, config.vocab_size, (ACCUM, MICRO, SEQ), generator=gen)
        t0 = clock()
        if on and next(on_steps) % args.every == 0:  # what GradPowerTrainer does at each step's begin
            meter.start()
        elif on:
            meter.stop()
        for micro in ids:
            (model(input_ids=micro, labels=micro).loss / ACCUM).backward()
        if on:
            meter.measure()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return clock() - t0

    for _ in range(args.warmup):
        step(False)
    times: dict[bool, list[float]] = {True: [], False: []}
    ratios, log_times = [], []
    for pair in range(args.blocks):
        means = {}
        for on in ((False, True) if pair % 2 == 0 else (True, False)):  # ABBA: drift and order cancel
            block = [step(on) for _ in range(args.block_steps)]
            if on:
                meter.stop()
                t1 = time.perf_counter()
                meter.stats()
                adam_snr(optimizer)
                log_times.append(time.perf_counter() - t1)
            times[on] += block
            means[on] = statistics.fmean(block)  # a mean: a median would skip the sampled steps
        ratios.append(means[True] / means[False])
    ids = torch.randint(0, config.vocab_size, (ACCUM, MICRO, SEQ), generator=gen)
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
    ratios.sort()
    q = statistics.quantiles(ratios, n=4)
    mean, se = statistics.fmean(ratios) - 1, statistics.stdev(ratios) / len(ratios) ** 0.5
    result = {
        "cpu": cpu_name(), "isa": isa(), "threads": torch.get_num_threads(), "steps_each": len(times[True]),
        "blocks": args.blocks, "block_steps": args.block_steps, "every": args.every, "clock": args.clock,
        "median_off_s": statistics.median(times[False]), "median_on_s": statistics.median(times[True]),
        "median_overhead": statistics.median(ratios) - 1, "q1_overhead": q[0] - 1, "q3_overhead": q[2] - 1,
        "mean_overhead": mean, "mean_overhead_2se": 2 * se,
        "meter_alone_s": statistics.median(alone),
        "meter_alone_share": statistics.median(alone) / statistics.median(times[False]),
        "log_values_s": statistics.median(log_times),
        "log_share": statistics.median(log_times) / (args.logging_steps * statistics.median(times[False])),
        "logging_steps": args.logging_steps, "target": TARGET, "setup": f"tiny LLaMA, AdamPower, batch {MICRO * ACCUM} = {ACCUM} x {MICRO}, seq {SEQ}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"noise_overhead_every{args.every}_{torch.get_num_threads()}threads.json").write_text(json.dumps(result, indent=1))
    print(f"[noise_overhead] {result['cpu']} ({result['isa']}, {result['threads']} threads), {result['setup']}: "
          f"step {result['median_off_s'] * 1e3:.1f} ms off, {result['median_on_s'] * 1e3:.1f} ms on; overhead "
          f"median {result['median_overhead']:+.2%} (IQR {result['q1_overhead']:+.2%} .. "
          f"{result['q3_overhead']:+.2%}), mean {mean:+.2%} +- {2 * se:.2%} (2 SE) over {args.blocks} pairs of {args.block_steps}-step blocks, measuring every {args.every} step(s), {args.clock} clock; the meter's work alone "
          f"{result['meter_alone_s'] * 1e3:.2f} ms = {result['meter_alone_share']:+.2%} of a step; logged values "
          f"{result['log_values_s'] * 1e3:.1f} ms per call = {result['log_share']:+.2%} at logging_steps "
          f"{args.logging_steps}; target < {TARGET:.0%}")
    return result


if __name__ == "__main__":
    main()
