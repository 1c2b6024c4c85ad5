"""The paper's GPU experiment grid: launch it, then collect terminal losses into the paper's table and plot.

    python -m benchmarks.gpu_grid list                       # the commands, one per run
    python -m benchmarks.gpu_grid run --only llama-0.2b      # launch (sequentially; finished runs skipped)
    python -m benchmarks.gpu_grid collect --out docs/gpu_grid

Each run is ``accelerate launch run_pretrain.py`` with a paper recipe (Appendix A), so everything about
it (batch, schedule, lr_max, tokens) comes from ``configs/`` and ``hf_gradpower.recipes``. A run counts
as finished when its output folder holds ``gradpower.json``; an interrupted run resumes from its latest
checkpoint. ``collect`` reads those files and writes a Markdown table (terminal eval loss, baseline vs
GradPower, gain, and the paper's reported gain where it gives one) and a scaling-law plot.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

OUTPUT_ROOT = Path("outputs/gpu_grid")


@dataclass(frozen=True)
class Run:
    experiment: str
    recipe: str
    model_config: str
    optim: str
    schedule: str

    @property
    def name(self) -> str:
        return f"{self.model_config}-{self.optim}-{self.schedule}"

    def output_dir(self, root: Path) -> Path:
        return root / self.experiment / self.name

    def command(self, root: Path, launcher: str = "accelerate launch") -> list[str]:
        out = self.output_dir(root)
        cmd = [*shlex.split(launcher), "run_pretrain.py", "--recipe", self.recipe, "--model_config", self.model_config,
               "--optim", self.optim, "--schedule", self.schedule, "--output_dir", str(out)]
        if (out / "trainer_state.json").exists() or any(out.glob("checkpoint-*")):
            cmd += ["--resume_from_checkpoint", "latest"]
        return cmd


def paper_grid() -> list[Run]:
    """Sections 3.2-3.4: dense LLaMA on C4 (cos, wsd) and OpenWebText, Qwen2MoE with wsd, Muon vs MuonPower."""
    runs: list[Run] = []
    for model in ("llama-66m", "llama-0.2b", "llama-0.4b", "llama-1b", "llama-2b"):
        for schedule in ("cos", "wsd"):
            runs += [Run("llama-c4", "c4", model, optim, schedule) for optim in ("adamw", "adampower")]
    runs += [Run("llama-owt", "openwebtext", "llama-0.25b-owt", optim, "cos") for optim in ("adamw", "adampower")]
    for model in ("qwen2moe-0.5b", "qwen2moe-1b", "qwen2moe-2b"):
        runs += [Run("qwen2moe-c4", "c4", model, optim, "wsd") for optim in ("adamw", "adampower")]
    runs += [Run("muon-c4", "c4", "llama-0.2b", optim, "wsd") for optim in ("muon", "muonpower")]
    return runs


# What the paper reports, to print beside our numbers (terminal loss gains are read off its text).
PAPER_REPORTED = {
    ("llama-c4", "llama-2b"): "AdamPower lowers terminal loss by 0.022",
    ("qwen2moe-c4", "qwen2moe-2b"): "AdamPower lowers terminal loss by 0.028 (loss ~1.93)",
    ("llama-c4", "zero-shot"): "LLaMA-2B zero-shot average 47.72 (AdamW) -> 48.26 (AdamPower)",
}
BASELINE_OF = {"adampower": "adamw", "muonpower": "muon"}


def collect(root: Path) -> list[dict]:
    """One row per (experiment, model, schedule) pair with both optimizers' terminal eval loss."""
    results = {}
    for run in paper_grid():
        info_path = run.output_dir(root) / "gradpower.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            results[run] = (info.get("final_eval_loss"), info.get("parameters"))
    rows = []
    for run in paper_grid():
        if run.optim not in BASELINE_OF:
            continue
        base = Run(run.experiment, run.recipe, run.model_config, BASELINE_OF[run.optim], run.schedule)
        (power_loss, params), (base_loss, _) = results.get(run, (None, None)), results.get(base, (None, None))
        rows.append({
            "experiment": run.experiment, "model": run.model_config, "schedule": run.schedule,
            "parameters": params, "baseline": base.optim, "method": run.optim,
            "baseline_loss": base_loss, "method_loss": power_loss,
            "gain": None if power_loss is None or base_loss is None else base_loss - power_loss,
            "paper": PAPER_REPORTED.get((run.experiment, run.model_config), ""),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    def f(v):
        return "not run" if v is None else f"{v:.4f}"

    lines = ["| experiment | model | schedule | baseline | loss | GradPower | loss | gain (lower loss) | paper |",
             "|---|---|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['model']} | {r['schedule']} | {r['baseline']} | {f(r['baseline_loss'])} "
                     f"| {r['method']} | {f(r['method_loss'])} | {f(r['gain'])} | {r['paper']} |")
    lines += ["", f"Paper, zero-shot: {PAPER_REPORTED[('llama-c4', 'zero-shot')]} (use run_eval.py on the 2B runs)."]
    return "\n".join(lines) + "\n"


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Terminal loss against parameters (log x), baseline vs GradPower, per experiment and schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series: dict[tuple, list] = {}
    for r in rows:
        for who, loss in (("baseline", r["baseline_loss"]), ("method", r["method_loss"])):
            if loss is not None and r["parameters"]:
                label = f"{r['experiment']}/{r['schedule']}: {r[who]}"
                series.setdefault((label, who), []).append((r["parameters"], loss))
    for (label, who), points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, "o--" if who == "baseline" else "o-", label=label)
    ax.set(xscale="log", xlabel="parameters", ylabel="terminal eval loss", title="Scaling: baseline vs GradPower")
    ax.grid(alpha=0.3, which="both")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "run", "collect"])
    parser.add_argument("--root", type=Path, default=OUTPUT_ROOT, help="where runs write their output folders")
    parser.add_argument("--only", default="", help="substring filter on experiment/model/optimizer names")
    parser.add_argument("--launcher", default="accelerate launch", help="e.g. 'accelerate launch --num_processes 8'")
    parser.add_argument("--out", type=Path, default=Path("docs/gpu_grid"))
    args = parser.parse_args(argv)
    runs = [r for r in paper_grid() if args.only in f"{r.experiment}/{r.name}"]
    if args.action == "list":
        for r in runs:
            print(shlex.join(r.command(args.root, args.launcher)))
    elif args.action == "run":
        for i, r in enumerate(runs, 1):
            if (r.output_dir(args.root) / "gradpower.json").exists():
                print(f"[{i}/{len(runs)}] {r.experiment}/{r.name}: finished, skipped")
                continue
            print(f"[{i}/{len(runs)}] {r.experiment}/{r.name}", flush=True)
            subprocess.run(r.command(args.root, args.launcher), check=True)
    else:
        rows = collect(args.root)
        args.out.mkdir(parents=True, exist_ok=True)
        report = markdown(rows)
        (args.out / "results.md").write_text(report)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
        plot_scaling(rows, args.out / "scaling.png")
        print(report)
        print(f"wrote {args.out}/results.md, results.json, scaling.png")


if __name__ == "__main__":
    main()
