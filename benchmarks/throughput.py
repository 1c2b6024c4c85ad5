"""End-to-end Trainer throughput: AdamPower vs AdamW, same model, data and seed, side by side.

    python -m benchmarks.throughput [--model_config llama-tiny] [--steps 40] [--warmup 5] [--rounds 3]
                                    [--seq_len 128] [--batch 16] [--out benchmarks/results]

Each round trains every optimizer for ``--steps`` steps through ``run_pretrain``'s own code path
(GradPowerTrainer on the embedded C4 sample). ``--mode sequential`` runs them one after the other and
alternates the order per round. ``--mode concurrent`` (default on a CPU with >= 2 cores) runs both at the
same time in two processes, each on half the cores, released together after start-up: drift of a
shared machine (other jobs, host noise) then hits both runs within the same seconds, which sequential
rounds cannot promise (there, per-round ratios here spread over +-10%). Each process is pinned to its half
of the cores and the halves swap every round, so a slow core (e.g. a virtual CPU the host steals from)
counts against both optimizers alike; the median of the per-round ratios is reported beside the pooled one. A callback times every optimizer step (forward, backward, clipping, phi, update), so
start-up, data loading, logging and saving stay out of the numbers; the first ``--warmup`` steps of each
run (allocator and kernel warm-up) are dropped. Tokens/s = tokens per step / median step time over the
timed steps of all rounds. The spread of the per-round medians and the range of the per-round ratios say
how much of a difference this machine can resolve (paper: +0.4% step time on GPU; target ratio >= 0.99).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.optimizer_step import cpu_name
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


class StartTogether(TrainerCallback):
    """Waits at a shared barrier when training begins, so concurrent runs start their steps together."""

    def __init__(self, barrier) -> None:
        self.barrier = barrier

    def on_train_begin(self, args, state, control, **kwargs):
        self.barrier.wait()


_BARRIER = None  # set in each concurrent worker by _init_worker


def _init_worker(barrier, threads: int) -> None:
    global _BARRIER
    _BARRIER = barrier
    torch.set_num_threads(threads)


def _concurrent_job(job: tuple) -> list[float]:
    optim, settings, workdir, cpus = job
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    return one_run(optim, argparse.Namespace(**settings), Path(workdir), extra=[StartTogether(_BARRIER)])


def _core_halves() -> list[list[int]]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    half = len(cpus) // 2
    return [cpus[:half], cpus[half : 2 * half]] if half else [[], []]


def concurrent_round(args, workdir: Path, round_index: int = 0) -> dict[str, list[float]]:
    """Both optimizers at once, one process each pinned to half the cores (halves swap with the round)."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 2) // len(OPTIMIZERS))
    settings = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    halves = _core_halves()
    jobs = [
        (optim, settings, str(workdir), halves[(i + round_index) % 2]) for i, optim in enumerate(OPTIMIZERS)
    ]
    with ctx.Pool(len(OPTIMIZERS), _init_worker, (ctx.Barrier(len(OPTIMIZERS)), threads), maxtasksperchild=1) as pool:
        return dict(zip(OPTIMIZERS, pool.map(_concurrent_job, jobs, chunksize=1), strict=True))


def one_run(optim: str, args, workdir: Path, extra: list | None = None) -> list[float]:
    """Seconds of each optimizer step of one ``--steps`` run with ``optim`` (warm-up steps included)."""
    timer = StepTimer()
    argv = [
        "--model_config", args.model_config, "--optim", optim, "--max_steps", str(args.steps),
        "--seq_len", str(args.seq_len), "--global_batch_size", str(args.batch),
        "--per_device_train_batch_size", str(args.batch), "--eval_strategy", "no", "--save_strategy", "no",
        "--logging_steps", str(args.steps), "--disable_tqdm", "true", "--output_dir", str(workdir / optim),
    ]  # fmt: skip
    run(argv, callbacks=[*(extra or []), timer])
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
        "median_round_ratio": statistics.median(round_ratios),
    }


def markdown(summary: dict, args, device: str) -> str:
    per, ratio, rr = summary["optimizers"], summary["ratio"], summary["round_ratios"]
    tokens = args.batch * args.seq_len
    noise = (
        f"Per-round ratios: {', '.join(f'{r:.3f}' for r in rr)} (median {summary['median_round_ratio']:.3f}, "
        f"range {min(rr):.3f}-{max(rr):.3f}, width "
        f"{max(rr) - min(rr):.3f}): differences smaller than that width are within this machine's "
        "round-to-round noise."
        if len(rr) > 1
        else "One round only: run more rounds (--rounds) for a noise estimate."
    )
    return "\n".join([
        f"### Trainer throughput on {device}: {args.model_config}, {args.batch} x {args.seq_len} = {tokens:,} "
        f"tokens per step, {args.steps} steps per run ({args.warmup} warm-up steps dropped), "
        f"{args.rounds} {'concurrent' if args.mode == 'concurrent' else 'alternating'} rounds",
        "",
        (f"Concurrent: in each round both runs trained at the same time, one process each with "
         f"{max(1, (os.cpu_count() or 2) // 2)} thread(s)." if args.mode == "concurrent"
         else "Sequential: the runs of a round trained one after the other, the order alternating per round."),
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
    parser.add_argument(
        "--mode", choices=("auto", "concurrent", "sequential"), default="auto",
        help="concurrent: both optimizers at once on half the cores each (default on CPU with >= 2 cores)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.mode == "auto":
        args.mode = "concurrent" if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else "sequential"
    for name in ("steps", "rounds", "seq_len", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be >= 0 and below --steps ({args.steps}), got {args.warmup}")
    times: dict[str, list[list[float]]] = {o: [] for o in OPTIMIZERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if args.mode == "concurrent":
                for optim, durations in concurrent_round(args, Path(tmp) / f"round{r}", r).items():
                    times[optim].append(durations)
                continue
            order = OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]
            for optim in order:
                times[optim].append(one_run(optim, args, Path(tmp) / f"round{r}"))
    summary = summarize(times, args.warmup, args.batch * args.seq_len)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
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
