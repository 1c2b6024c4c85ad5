"""End-to-end Trainer throughput: AdamPower vs AdamW, same model, data and seed, side by side.

    python -m benchmarks.throughput [--model_config llama-tiny] [--steps 40] [--warmup 5] [--rounds 3]
                                    [--seq_len 128] [--batch 16] [--out benchmarks/results]

Each round trains every optimizer for ``--steps`` steps through ``run_pretrain``'s own code path
(GradPowerTrainer on the embedded C4 sample); rounds alternate the order so drift on a shared machine
hits both alike. A callback times every optimizer step (forward, backward, clipping, phi, update), so
start-up, data loading, logging and saving stay out of the numbers; the first ``--warmup`` steps of each
run (allocator and kernel warm-up) are dropped. Tokens/s = tokens per step / median step time over the
timed steps of all rounds. The spread of the per-round medians and the range of the per-round ratios say
how much of a difference this machine can resolve (paper: +0.4% step time on GPU; target ratio >= 0.99).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_gradpower.pretrain import run

OPTIMIZERS = ("adamw", "adampower")  # baseline first: ratio = AdamPower / AdamW tokens/s
TARGET_RATIO = 0.99


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from ``on_step_begin`` to ``on_step_end``.

    Trainer fetches the step's batches before ``on_step_begin`` and logs, evaluates and saves after
    ``on_step_end``, so the window holds exactly forward, backward, clipping, GradPower and the optimizer
    update (one call per optimizer step, whatever the gradient accumulation). On CUDA both ends
    synchronize, so the window covers the kernels and not only their launch.
    """

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start: float | None = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(self._now() - self._start)


def one_run(optim: str, args, workdir: Path) -> list[float]:
    """Seconds of each optimizer step of one ``--steps`` run with ``optim`` (warm-up steps included)."""
    timer = StepTimer()
    argv = [
        "--model_config", args.model_config, "--optim", optim, "--max_steps", str(args.steps),
        "--seq_len", str(args.seq_len), "--global_batch_size", str(args.batch),
        "--per_device_train_batch_size", str(args.batch), "--eval_strategy", "no", "--save_strategy", "no",
        "--logging_steps", str(args.steps), "--disable_tqdm", "true", "--output_dir", str(workdir / optim),
    ]  # fmt: skip
    run(argv, callbacks=[timer])
    return timer.durations


def summarize(times: dict[str, list[list[float]]], warmup: int, tokens_per_step: int) -> dict:
    """Per optimizer: median step time over all rounds' timed steps, tokens/s, per-round medians and their
    spread ((max - min) / median); the AdamPower / AdamW tokens/s ratio and its value in each round.

    ``times[optim][round]`` holds one run's step durations in order; the first ``warmup`` are dropped.
    """
    per: dict[str, dict] = {}
    for optim, rounds in times.items():
        kept = [durations[warmup:] for durations in rounds]
        median = statistics.median(t for durations in kept for t in durations)
        round_medians = [statistics.median(durations) for durations in kept]
        per[optim] = {
            "median_step_s": median,
            "tokens_per_s": tokens_per_step / median,
            "round_median_step_s": round_medians,
            "spread": (max(round_medians) - min(round_medians)) / median,
        }
    base, power = (per[o] for o in OPTIMIZERS)
    round_ratios = [
        b / p for b, p in zip(base["round_median_step_s"], power["round_median_step_s"], strict=True)
    ]
    return {
        "optimizers": per,
        "ratio": power["tokens_per_s"] / base["tokens_per_s"],
        "round_ratios": round_ratios,
    }


def markdown(summary: dict, args, device: str) -> str:
    per, ratio, rr = summary["optimizers"], summary["ratio"], summary["round_ratios"]
    tokens = args.batch * args.seq_len
    noise = (
        f"Per-round ratios: {', '.join(f'{r:.3f}' for r in rr)} (range {min(rr):.3f}-{max(rr):.3f}, width "
        f"{max(rr) - min(rr):.3f}): differences smaller than that width are within this machine's "
        "round-to-round noise."
        if len(rr) > 1
        else "One round only: run more rounds (--rounds) for a noise estimate."
    )
    return "\n".join([
        f"### Trainer throughput on {device}: {args.model_config}, {args.batch} x {args.seq_len} = {tokens:,} "
        f"tokens per step, {args.steps} steps per run ({args.warmup} warm-up steps dropped), "
        f"{args.rounds} alternating rounds",
        "",
        "Step time: wall time of each optimizer step (forward, backward, clipping, GradPower, update; timed by a "
        "Trainer callback). Tokens/s = tokens per step / median step time over the timed steps of all rounds. "
        "Spread = (max - min) / median of the per-round median step times.",
        "",
        "| optimizer | median step time (ms) | tokens/s | per-round median step time (ms) | spread |",
        "|---|---:|---:|---|---:|",
        *(
            f"| {o} | {per[o]['median_step_s'] * 1e3:.1f} | {per[o]['tokens_per_s']:,.0f} "
            f"| {', '.join(f'{t * 1e3:.1f}' for t in per[o]['round_median_step_s'])} | {per[o]['spread']:.1%} |"
            for o in OPTIMIZERS
        ),
        "",
        f"AdamPower / AdamW throughput ratio: **{ratio:.3f}** (target >= {TARGET_RATIO}: "
        f"{'met' if ratio >= TARGET_RATIO else 'not met'}). {noise}",
        "",
    ])  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default="llama-tiny")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run, warm-up included")
    parser.add_argument(
        "--warmup", type=int, default=5, help="first steps of each run left out of the timing"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "seq_len", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be >= 0 and below --steps ({args.steps}), got {args.warmup}")
    times: dict[str, list[list[float]]] = {o: [] for o in OPTIMIZERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]
            for optim in order:
                times[optim].append(one_run(optim, args, Path(tmp) / f"round{r}"))
    summary = summarize(times, args.warmup, args.batch * args.seq_len)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    report = markdown(summary, args, device)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_" + ("cuda" if torch.cuda.is_available() else "cpu")
    (args.out / f"{stem}.md").write_text(report)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"device": device, "settings": settings, **summary, "step_times_s": times}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
