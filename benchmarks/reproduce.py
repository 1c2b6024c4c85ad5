"""CPU reproduction suite: GradPower vs its baseline optimizer on tiny models, paired over seeds.

    python -m benchmarks.reproduce [--smoke] [--out docs/reproduction] [--seeds 3] [--budget_min 60]

Every run goes through ``run_pretrain``'s own code path (``hf_gradpower.pretrain.run``) on the
embedded C4 sample. Comparisons (baseline vs GradPower, same init and data order per seed):

1. tiny LLaMA, AdamW vs AdamPower (p=1.2), cosine schedule
2. the same under WSD
3. tiny Qwen2MoE, AdamW vs AdamPower under WSD, with loss-spike counts (logging every step)
4. Muon vs MuonPower (tiny LLaMA, WSD)
5. AdamW + blockwise LR vs AdamPower + blockwise LR (tiny LLaMA, WSD)
6. p sweep {0.8, ..., 1.5} with AdamPower (tiny LLaMA, WSD; 1 seed)
7. p in {0.8, 1.0, 1.2, 1.5} vs global batch {4, 8, 32} at EQUAL TOKENS (steps x batch constant; 1 seed)

Full mode first times a 20-step tiny-LLaMA run, then sizes the steps so the whole suite fits in
``--budget_min`` minutes; the plan is kept in ``<out>/plan.json`` and every run's metrics in
``<out>/runs/<key>.json``, so an interrupted suite resumes where it stopped (existing runs are skipped).
``--smoke``: one seed, 8 steps, tiny evaluation, same code path and report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LR = 1e-3
P_MAIN = 1.2
P_SWEEP = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)
P_BATCH = (0.8, 1.0, 1.2, 1.5)
BATCHES = (4, 8, 32)
BASE_BATCH = 8
SEQ_LEN = 128
SPIKE_WINDOW = 20
SPIKE_THRESHOLD = 0.1
SPIKE_MIN_HISTORY = 5
# Relative cost per step of a run vs tiny LLaMA + AdamW at batch 8 (measured here: Qwen2MoE ~2.7x).
MODEL_COST = {"llama-tiny": 1.0, "qwen2moe-tiny": 2.8}
OPTIM_COST = {"muon": 1.3, "muonpower": 1.3}


@dataclass(frozen=True)
class RunSpec:
    model: str = "llama-tiny"
    optim: str = "adamw"
    schedule: str = "wsd"
    p: float | None = None
    batch: int = BASE_BATCH
    steps: int = 100
    seed: int = 0
    blockwise: bool = False
    logging_steps: int = 1

    @property
    def key(self) -> str:
        parts = [self.model, self.optim, self.schedule]
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        if self.blockwise:
            parts.append("blockwise")
        parts += [f"b{self.batch}", f"s{self.steps}", f"log{self.logging_steps}", f"seed{self.seed}"]
        return "_".join(parts)

    @property
    def label(self) -> str:
        name = {"adamw": "AdamW", "adampower": "AdamPower", "muon": "Muon", "muonpower": "MuonPower"}[self.optim]
        if self.p is not None:
            name += f" p={self.p:g}"
        return name + (" +blockwise LR" if self.blockwise else "")

    def cost(self) -> float:
        """Estimated steps-equivalent of tiny LLaMA AdamW at batch 8."""
        return self.steps * self.batch / BASE_BATCH * MODEL_COST[self.model] * OPTIM_COST.get(self.optim, 1.0)


@dataclass
class Plan:
    smoke: bool
    seeds: int
    steps: int  # at batch 8; equal tokens for other batch sizes
    step_time: float  # seconds per tiny-LLaMA AdamW step at batch 8 (measured)
    overhead: float  # seconds of fixed cost per run (data, model build, save)
    eval_docs: int
    max_eval_blocks: int


# --------------------------------------------------------------------------------------------- plan
def comparisons(plan: Plan) -> list[dict]:
    """The suite: each comparison is a list of (baseline, gradpower) spec pairs, one per seed."""
    s, seeds = plan.steps, range(plan.seeds)
    log = max(1, s // 50)
    base = RunSpec(steps=s, logging_steps=log)

    def pairs(**kw) -> list[tuple[RunSpec, RunSpec]]:
        out = []
        for seed in seeds:
            b = replace(base, seed=seed, **kw)
            power = b.optim.replace("adamw", "adampower").replace("muon", "muonpower")
            out.append((b, replace(b, optim=power, p=P_MAIN)))
        return out

    return [
        {"name": "1. LLaMA AdamW vs AdamPower (cos)", "pairs": pairs(schedule="cos")},
        {"name": "2. LLaMA AdamW vs AdamPower (wsd)", "pairs": pairs()},
        {"name": "3. Qwen2MoE AdamW vs AdamPower (wsd)", "pairs": pairs(model="qwen2moe-tiny", logging_steps=1),
         "spikes": True},
        {"name": "4. LLaMA Muon vs MuonPower (wsd)", "pairs": pairs(optim="muon")},
        {"name": "5. LLaMA blockwise LR: AdamW vs AdamPower (wsd)", "pairs": pairs(blockwise=True)},
    ]


def p_sweep_specs(plan: Plan) -> list[RunSpec]:
    return [RunSpec(optim="adampower", p=p, steps=plan.steps, logging_steps=max(1, plan.steps // 50), seed=0)
            for p in P_SWEEP]


def batch_specs(plan: Plan) -> list[RunSpec]:
    out = []
    for b in BATCHES:
        steps = max(1, plan.steps * BASE_BATCH // b)
        for p in P_BATCH:
            out.append(RunSpec(optim="adampower", p=p, batch=b, steps=steps,
                               logging_steps=max(1, steps // 50), seed=0))
    return out


def all_specs(plan: Plan) -> list[RunSpec]:
    specs = [r for c in comparisons(plan) for pair in c["pairs"] for r in pair]
    specs += p_sweep_specs(plan) + batch_specs(plan)
    return list(dict.fromkeys(specs))  # identical runs are shared (e.g. p=1.2 wsd is in 2, 6 and 7)


def estimate_seconds(specs: list[RunSpec], plan: Plan) -> float:
    return sum(plan.overhead + r.cost() * plan.step_time for r in specs)


# ---------------------------------------------------------------------------------------------- runs
def _argv(spec: RunSpec, plan: Plan, output_dir: Path) -> list[str]:
    optim = spec.optim
    argv = [
        "--model_config", spec.model, "--optim", optim, "--schedule", spec.schedule,
        "--max_steps", str(spec.steps), "--seq_len", str(SEQ_LEN), "--global_batch_size", str(spec.batch),
        "--per_device_train_batch_size", str(spec.batch), "--per_device_eval_batch_size", "8", "--learning_rate", str(LR),
        "--seed", str(spec.seed), "--data_seed", str(spec.seed),
        "--eval_steps", str(max(1, spec.steps // (1 if plan.smoke else 10))), "--save_strategy", "no",
        "--logging_steps", str(spec.logging_steps), "--eval_docs", str(plan.eval_docs),
        "--max_eval_blocks", str(plan.max_eval_blocks), "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]
    if spec.p is not None:
        argv += ["--gradpower_p", str(spec.p)]
    if spec.blockwise:
        argv += ["--blockwise_lr", "true"]
    return argv


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
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            out = run(_argv(spec, plan, tmp / "run"))
        wall = time.perf_counter() - t0
        history = json.loads((out / "metrics.json").read_text())
        summary = json.loads((out / "gradpower.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runtime = next(r["train_runtime"] for r in history if "train_runtime" in r)
    result = {"spec": asdict(spec), "key": spec.key, "wall_s": wall, "train_runtime": runtime,
              "s_per_step": runtime / spec.steps, "final_eval_loss": summary.get("final_eval_loss"),
              "final_train_loss": summary.get("final_train_loss"), "summary": summary, "log_history": history}
    runs_dir.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(result, indent=1))
    os.replace(part, path)  # atomic: an interrupted run leaves no result file
    return result, True


def calibrate(plan_smoke: bool, runs_dir: Path) -> tuple[float, float]:
    """(seconds per step, fixed seconds per run) from a short tiny-LLaMA AdamW run at batch 8."""
    steps = 4 if plan_smoke else 20
    probe = Plan(smoke=True, seeds=1, steps=steps, step_time=0, overhead=0, eval_docs=10, max_eval_blocks=8)
    result, _ = execute(RunSpec(steps=steps, logging_steps=steps, seed=99), probe, runs_dir / "calibration")
    step_time = result["s_per_step"]
    return step_time, max(0.5, result["wall_s"] - result["train_runtime"])


def make_plan(args) -> Plan:
    path = args.out / "plan.json"
    if path.exists():
        plan = Plan(**json.loads(path.read_text()))
        if plan.smoke == args.smoke and plan.seeds == args.seeds:
            return plan
    step_time, overhead = calibrate(args.smoke, args.out / "runs")
    if args.smoke:
        plan = Plan(True, 1, 8, step_time, overhead, eval_docs=10, max_eval_blocks=8)
    else:
        plan = Plan(False, args.seeds, 100, step_time, overhead, eval_docs=50, max_eval_blocks=64)
        unit = all_specs(plan)  # cost is linear in steps: size them to the budget
        per_step = sum(r.cost() for r in unit) / plan.steps * step_time
        evals = len(unit) * 11 * 0.3  # ~11 evaluations of 64 blocks per run
        budget = args.budget_min * 60 - len(unit) * overhead - evals
        plan.steps = max(50, min(2000, int(budget / per_step) // 10 * 10))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(plan), indent=1))
    return plan


# ------------------------------------------------------------------------------------------- summary
def summarize_pair(baseline: list[float], gradpower: list[float]) -> dict:
    """Paired comparison over seeds: means, stds, mean difference (GradPower - baseline) and noise flag.

    ``exceeds_noise``: |mean difference| > 2 x standard error of the paired differences (None with < 2 seeds).
    """
    if len(baseline) != len(gradpower) or not baseline:
        raise ValueError("need the same, non-zero number of seeds for both optimizers")
    n = len(baseline)
    diffs = [g - b for b, g in zip(baseline, gradpower, strict=True)]

    def std(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else float("nan")

    se = std(diffs) / math.sqrt(n) if n > 1 else float("nan")
    diff = statistics.fmean(diffs)
    return {
        "n": n, "baseline_mean": statistics.fmean(baseline), "baseline_std": std(baseline),
        "gradpower_mean": statistics.fmean(gradpower), "gradpower_std": std(gradpower),
        "diff": diff, "diff_se": se, "exceeds_noise": None if n < 2 else abs(diff) > 2 * se,
    }


def count_spikes(losses: list[float], window: int = SPIKE_WINDOW, threshold: float = SPIKE_THRESHOLD,
                 min_history: int = SPIKE_MIN_HISTORY) -> int:
    """Logged losses exceeding the median of the previous ``window`` logged losses by more than ``threshold``."""
    return sum(
        1 for i in range(min_history, len(losses))
        if losses[i] > statistics.median(losses[max(0, i - window):i]) + threshold
    )


def _curve(result: dict, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in result["log_history"] if key in r and "step" in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _mean_curve(results: list[dict], key: str) -> tuple[list[int], list[float]]:
    curves = [_curve(r, key) for r in results]
    steps = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    maps = [dict(zip(s, v, strict=True)) for s, v in curves]
    return steps, [statistics.fmean(m[s] for m in maps) for s in steps]


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _plot_comparison(name: str, base: list[dict], power: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for results, color in ((base, "tab:blue"), (power, "tab:red")):
        label = RunSpec(**results[0]["spec"]).label
        s, v = _mean_curve(results, "loss")
        ax.plot(s, v, color=color, alpha=0.6, label=f"{label} train")
        s, v = _mean_curve(results, "eval_loss")
        ax.plot(s, v, "o--", color=color, label=f"{label} eval")
    ax.set(title=f"{name} (mean of {len(base)} seed(s))", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _slug(name: str) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in name.lower())
    return "_".join(part for part in slug.split("_") if part)[:60]


def write_report(plan: Plan, results: dict[str, dict], out: Path, elapsed: float) -> Path:
    regime = (f"{plan.steps} steps x batch {BASE_BATCH} x {SEQ_LEN} tokens = "
              f"{plan.steps * BASE_BATCH * SEQ_LEN:,} tokens per run")
    lines = [
        "# GradPower CPU reproduction" + (" (SMOKE: 1 seed, a few steps; numbers are not meaningful)"
                                          if plan.smoke else ""),
        "",
        f"- Regime of comparisons 1-6: {regime}; lr {LR:g} (x blockwise multipliers in 5), p = {P_MAIN} "
        f"unless swept; eval on {plan.max_eval_blocks} held-out blocks of {SEQ_LEN} tokens ({plan.eval_docs} docs).",
        f"- Seeds: {plan.seeds} for comparisons 1-5 (baseline and GradPower share init and data order per seed); "
        "1 seed (seed 0) for the p sweep (6) and the batch study (7).",
        f"- Measured step time (tiny LLaMA AdamW, batch 8): {plan.step_time:.3f} s; "
        f"suite wall time of this invocation: {elapsed:.0f} s.",
        "- Terminal eval loss = eval loss of the final model. Difference = GradPower - baseline "
        "(negative: GradPower better). Noise flag: |mean paired difference| > 2 x its standard error.",
        f"- Loss spikes (3): logged train losses (every step) above the median of the previous {SPIKE_WINDOW} "
        f"logged losses by more than {SPIKE_THRESHOLD} (from the {SPIKE_MIN_HISTORY + 1}th logged loss on).",
        "",
        "## Comparisons 1-5",
        "",
        "| comparison | baseline | GradPower | seeds | baseline eval loss | GradPower eval loss | difference "
        "| 2 x SE | exceeds noise | s/step baseline | s/step GradPower | spikes baseline / GradPower |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    summaries = []
    for comp in comparisons(plan):
        base = [results[b.key] for b, _ in comp["pairs"]]
        power = [results[g.key] for _, g in comp["pairs"]]
        s = summarize_pair([r["final_eval_loss"] for r in base], [r["final_eval_loss"] for r in power])
        spikes = "-"
        if comp.get("spikes"):
            sb = [count_spikes(_curve(r, "loss")[1]) for r in base]
            sg = [count_spikes(_curve(r, "loss")[1]) for r in power]
            spikes = f"{sum(sb)} / {sum(sg)}"
            s["spikes"] = {"baseline": sb, "gradpower": sg}
        flag = "n/a (1 seed)" if s["exceeds_noise"] is None else ("**yes**" if s["exceeds_noise"] else "no")
        two_se = "n/a" if math.isnan(s["diff_se"]) else f"{2 * s['diff_se']:.4f}"
        sps = [statistics.fmean(r["s_per_step"] for r in rs) for rs in (base, power)]
        lines.append(
            f"| {comp['name']} | {RunSpec(**base[0]['spec']).label} | {RunSpec(**power[0]['spec']).label} "
            f"| {s['n']} | {_fmt(s['baseline_mean'], s['baseline_std'])} "
            f"| {_fmt(s['gradpower_mean'], s['gradpower_std'])} | {s['diff']:+.4f} | {two_se} | {flag} "
            f"| {sps[0]:.3f} | {sps[1]:.3f} | {spikes} |")
        png = f"{_slug(comp['name'])}.png"
        _plot_comparison(comp["name"], base, power, out / png)
        summaries.append({"name": comp["name"], **s, "png": png})
    lines += ["", *(f"![{c['name']}]({c['png']})" for c in summaries), ""]

    # 6. p sweep
    sweep = [(r.p, results[r.key]["final_eval_loss"]) for r in p_sweep_specs(plan)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p for p, _ in sweep], [v for _, v in sweep], "o-")
    ax.set(title="6. AdamPower p sweep (tiny LLaMA, wsd, 1 seed)", xlabel="p", ylabel="terminal eval loss")
    fig.tight_layout()
    fig.savefig(out / "p_sweep.png", dpi=90)
    plt.close(fig)
    best_p = min(sweep, key=lambda x: x[1])[0]
    lines += [
        f"## 6. p sweep (AdamPower, tiny LLaMA, wsd, {regime}, 1 seed: differences below the seed noise "
        "of comparisons 1-5 are not meaningful)", "",
        "| p | terminal eval loss |", "|---:|---:|",
        *(f"| {p:g} | {v:.4f} |" for p, v in sweep), "", f"Best p: **{best_p:g}** (p=1 is AdamW).", "",
        "![p sweep](p_sweep.png)", "",
    ]

    # 7. best p vs batch size at equal tokens
    by_batch: dict[int, list[tuple[float, float, int]]] = {}
    for r in batch_specs(plan):
        by_batch.setdefault(r.batch, []).append((r.p, results[r.key]["final_eval_loss"], r.steps))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    rows = []
    for b, vals in by_batch.items():
        ax1.plot([p for p, _, _ in vals], [v for _, v, _ in vals], "o-", label=f"batch {b}")
        best = min(vals, key=lambda x: x[1])
        rows.append((b, vals[0][2], best[0], vals))
    ax1.set(xlabel="p", ylabel="terminal eval loss", title="eval loss vs p")
    ax1.legend(fontsize=8)
    ax2.plot([b for b, *_ in rows], [bp for _, _, bp, _ in rows], "s-")
    ax2.set(xscale="log", xlabel="global batch (sequences)", ylabel="best p", title="best p vs batch")
    fig.suptitle("7. AdamPower: best p vs batch size (equal tokens, 1 seed)")
    fig.tight_layout()
    fig.savefig(out / "best_p_vs_batch.png", dpi=90)
    plt.close(fig)
    lines += [
        f"## 7. Best p vs batch size (AdamPower, tiny LLaMA, wsd, lr {LR:g}, EQUAL TOKENS: "
        f"{plan.steps * BASE_BATCH * SEQ_LEN:,} tokens per run, steps = {plan.steps} x {BASE_BATCH} / batch; 1 seed)",
        "",
        "| global batch | steps | " + " | ".join(f"p={p:g}" for p in P_BATCH) + " | best p |",
        "|---:|---:|" + "---:|" * len(P_BATCH) + "---:|",
        *(f"| {b} | {st} | " + " | ".join(f"{v:.4f}" for _, v, _ in vals) + f" | {bp:g} |"
          for b, st, bp, vals in rows),
        "", "![best p vs batch](best_p_vs_batch.png)", "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(
        {"plan": asdict(plan), "comparisons": summaries, "p_sweep": sweep,
         "batch": [{"batch": b, "steps": st, "best_p": bp} for b, st, bp, _ in rows]}, indent=1, default=str))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 8 steps, tiny eval (< 90 s)")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget_min", type=float, default=60.0, help="target wall time of the full suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds = 1
    t0 = time.perf_counter()
    plan = make_plan(args)
    specs = all_specs(plan)
    runs_dir = args.out / "runs"
    todo = [r for r in specs if not (runs_dir / f"{r.key}.json").exists()]
    est = estimate_seconds(todo, plan)
    print(f"[reproduce] {'smoke' if plan.smoke else 'full'}: {len(specs)} runs ({len(specs) - len(todo)} done), "
          f"{plan.steps} steps at batch {BASE_BATCH}, {plan.seeds} seed(s); measured {plan.step_time:.3f} s/step, "
          f"{plan.overhead:.1f} s/run overhead; estimated {est / 60:.1f} min for the {len(todo)} to run", flush=True)
    results, done_cost, spent = {}, 0.0, 0.0
    for i, spec in enumerate(specs, 1):
        t = time.perf_counter()
        results[spec.key], ran = execute(spec, plan, runs_dir)
        if ran:
            spent += time.perf_counter() - t
            done_cost += estimate_seconds([spec], plan)
            left = [r for r in specs[i:] if r.key not in results and not (runs_dir / f"{r.key}.json").exists()]
            remaining = estimate_seconds(left, plan) * (spent / done_cost if done_cost else 1.0)
            print(f"[{i}/{len(specs)}] {spec.key}: eval {results[spec.key]['final_eval_loss']:.4f} "
                  f"({time.perf_counter() - t:.1f} s) | elapsed {time.perf_counter() - t0:.0f} s, "
                  f"~{remaining:.0f} s remaining", flush=True)
        else:
            print(f"[{i}/{len(specs)}] {spec.key}: cached", flush=True)
    report = write_report(plan, results, args.out, time.perf_counter() - t0)
    print(f"[reproduce] report: {report} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
