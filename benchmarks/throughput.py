"""End-to-end Trainer throughput: AdamPower vs AdamW, same model, data and seed, side by side.

    python -m benchmarks.throughput [--model_config llama-tiny] [--steps 40] [--rounds 3] [--out benchmarks/results]

Each round trains every optimizer for ``--steps`` steps through ``run_pretrain``'s own code path
(GradPowerTrainer on the embedded C4 sample); rounds alternate the order so drift on a shared
machine hits both alike. Reports median tokens/s per optimizer and the ratio (paper: +0.4% step
time on GPU; target ratio >= 0.99).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from hf_gradpower.pretrain import run

OPTIMIZERS = ("adamw", "adampower")


def one_run(optim: str, args, workdir: Path) -> float:
    """Tokens per second of the training loop (Trainer's train_runtime), for one optimizer."""
    out = run([
        "--model_config", args.model_config, "--optim", optim, "--max_steps", str(args.steps),
        "--seq_len", str(args.seq_len), "--global_batch_size", str(args.batch),
        "--per_device_train_batch_size", str(args.batch), "--eval_strategy", "no", "--save_strategy", "no",
        "--logging_steps", str(args.steps), "--disable_tqdm", "true", "--output_dir", str(workdir / optim),
    ])
    history = json.loads((out / "metrics.json").read_text())
    runtime = next(row["train_runtime"] for row in history if "train_runtime" in row)
    return args.steps * args.batch * args.seq_len / runtime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default="llama-tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    tokens_per_s: dict[str, list[float]] = {o: [] for o in OPTIMIZERS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]
            for optim in order:
                tokens_per_s[optim].append(one_run(optim, args, Path(tmp) / f"round{r}"))
    median = {o: statistics.median(v) for o, v in tokens_per_s.items()}
    ratio = median["adampower"] / median["adamw"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    report = "\n".join([
        f"### Trainer throughput on {device}: {args.model_config}, {args.steps} steps x {args.batch} x "
        f"{args.seq_len} tokens, median of {args.rounds} alternating rounds",
        "",
        "| optimizer | tokens/s (median) | all rounds |",
        "|---|---:|---|",
        *(f"| {o} | {median[o]:,.0f} | {', '.join(f'{x:,.0f}' for x in tokens_per_s[o])} |" for o in OPTIMIZERS),
        "",
        f"AdamPower / AdamW throughput ratio: **{ratio:.3f}** (target >= 0.99)",
        "",
    ])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_" + ("cuda" if torch.cuda.is_available() else "cpu")
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps({"tokens_per_s": tokens_per_s, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
