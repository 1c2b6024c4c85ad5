"""Cost of the gradient noise meter: the same tiny run with ``--gradpower_noise`` off and on, interleaved.

    python -m benchmarks.noise_overhead [--rounds 5] [--steps 40] [--warmup 5] [--out benchmarks/results]

Each round trains tiny LLaMA (AdamPower, global batch 8 = 2 micro-batches of 4, sequences of 128) through
``run_pretrain``'s code path twice, once without and once with the meter (per-micro-batch gradient hooks,
the per-step estimate and the logging of the noise with the loss), alternating which goes first. A
``StepTimer`` (benchmarks.throughput) times every optimizer step; the first ``--warmup`` are dropped. The
overhead of a round is median(step, meter on) / median(step, meter off) - 1; reported: the median over the
rounds and their range (the machine is shared, so single rounds drift). Target: < 2%.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from benchmarks.throughput import StepTimer
from hf_gradpower.pretrain import run

TARGET = 0.02


def one_run(noise: bool, steps: int, seed: int) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="gp_noise_overhead_") as tmp:
        argv = ["--model_config", "llama-tiny", "--optim", "adampower", "--seq_len", "128",
                "--global_batch_size", "8", "--per_device_train_batch_size", "4", "--max_steps", str(steps),
                "--logging_steps", "5", "--eval_strategy", "no", "--save_strategy", "no", "--eval_docs", "20",
                "--disable_tqdm", "true", "--seed", str(seed), "--gradpower_noise", str(noise).lower(),
                "--output_dir", str(Path(tmp) / "run")]
        run(argv, callbacks=[timer])
    return timer.durations


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    rounds = []
    for r in range(args.rounds):
        medians = {}
        for noise in ((False, True) if r % 2 == 0 else (True, False)):
            medians[noise] = statistics.median(one_run(noise, args.steps, seed=r)[args.warmup:])
        rounds.append({"off_s": medians[False], "on_s": medians[True], "overhead": medians[True] / medians[False] - 1})
        print(f"[noise_overhead] round {r}: off {medians[False] * 1e3:.1f} ms, on {medians[True] * 1e3:.1f} ms, "
              f"overhead {rounds[-1]['overhead']:+.2%}", flush=True)
    overheads = [x["overhead"] for x in rounds]
    result = {"cpu": cpu_name(), "rounds": rounds, "median_overhead": statistics.median(overheads),
              "min_overhead": min(overheads), "max_overhead": max(overheads), "target": TARGET,
              "setup": "tiny LLaMA, AdamPower, batch 8 = 2 x 4 micro-batches, seq 128"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"[noise_overhead] {result['cpu']}: median overhead {result['median_overhead']:+.2%} "
          f"(range {result['min_overhead']:+.2%} .. {result['max_overhead']:+.2%}; target < {TARGET:.0%})")
    return result


if __name__ == "__main__":
    main()
