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
8. tiny LLaMA, AdamW vs AdamPower (p=1.2) under WSD in a LONG regime: ``Plan.long_steps`` (2000) steps,
   same seeds as 1-5, reported beside 2 ("Two regimes"): the paper's noise theory says the regime matters.

Full mode first times a 20-step tiny-LLaMA run, sets the long regime aside (its length is fixed), then
sizes the steps of 1-7 so the whole suite fits in ``--budget_min`` minutes; the plan is kept in
``<out>/plan.json`` and every run's metrics in ``<out>/runs/<key>.json``, so an interrupted suite resumes
where it stopped (existing runs are skipped). A plan.json from before comparison 8 keeps its steps and gets
``long_steps`` added, so only the long runs are new.
``--smoke``: one seed, 8 steps (12 for 8), tiny evaluation, same code path and report.
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
LONG_STEPS = 2000  # comparison 8: long enough for the ordering seen in the issue's quick check to show
SMOKE_LONG_STEPS = 12  # differs from the smoke steps (8), so the smoke suite trains comparison 8's own runs
EVALS = 10  # evaluations along each full-mode run (smoke: only the final one)
P_RAMP = "linear:0.9:1.2"  # comparisons 9/12: p from the short-regime sweep's best up to the paper's default
AUTO = {"p": None, "p_spec": "auto", "micro_batch": 4}  # 2 micro-batches of 4: the noise is measurable
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
    p_spec: str | None = None  # a p schedule (``--gradpower_p``), e.g. "auto" or "linear:0.9:1.2"
    micro_batch: int | None = None  # per-device batch < batch: accumulation, so the noise can be measured

    @property
    def key(self) -> str:
        parts = [self.model, self.optim, self.schedule]
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        if self.p_spec is not None:
            parts.append("p" + self.p_spec.replace(":", "-"))
        if self.micro_batch is not None:
            parts.append(f"mb{self.micro_batch}")
        if self.blockwise:
            parts.append("blockwise")
        parts += [f"b{self.batch}", f"s{self.steps}", f"log{self.logging_steps}", f"seed{self.seed}"]
        return "_".join(parts)

    @property
    def label(self) -> str:
        name = {"adamw": "AdamW", "adampower": "AdamPower", "muon": "Muon", "muonpower": "MuonPower"}[
            self.optim
        ]
        if self.p is not None:
            name += f" p={self.p:g}"
        if self.p_spec is not None:
            name += f" p={self.p_spec}"
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
    long_steps: int = LONG_STEPS  # comparison 8, at batch 8; fixed, not sized to the budget


# --------------------------------------------------------------------------------------------- plan
def _pairs(base: RunSpec, seeds: int, power: dict | None = None, **kw) -> list[tuple[RunSpec, RunSpec]]:
    """(baseline, GradPower) per seed: the same spec (so the same init and data order) but the optimizer
    (p = ``P_MAIN`` unless ``power`` overrides GradPower's fields, e.g. a p schedule)."""
    out = []
    for seed in range(seeds):
        b = replace(base, seed=seed, **kw)
        optim = b.optim.replace("adamw", "adampower").replace("muon", "muonpower")
        out.append((b, replace(b, optim=optim, **({"p": P_MAIN} | (power or {})))))
    return out


def noise_comparisons(plan: Plan, long: bool) -> list[dict]:
    """Comparisons 9-13: p schedules (a ramp, auto) against the baseline, short regime and long regime."""
    steps = plan.long_steps if long else plan.steps
    base = RunSpec(steps=steps, logging_steps=max(1, steps // (100 if long else 50)))
    tag = "long" if long else "short"
    comps = [
        {"name": f"{'12' if long else '9'}. LLaMA AdamW vs AdamPower p ramp ({tag}, wsd)",
         "pairs": _pairs(base, plan.seeds, power={"p": None, "p_spec": P_RAMP})},
        {"name": f"{'13' if long else '10'}. LLaMA AdamW vs AdamPower p auto ({tag}, wsd)",
         "pairs": _pairs(base, plan.seeds, power=AUTO)},
    ]
    if not long:
        comps.append({"name": "11. LLaMA Muon vs MuonPower p auto (short, wsd)",
                      "pairs": _pairs(base, plan.seeds, power=AUTO, optim="muon")})
    return comps


def noise_specs(plan: Plan, long: bool) -> list[RunSpec]:
    return [r for c in noise_comparisons(plan, long) for pair in c["pairs"] for r in pair]


def comparisons(plan: Plan) -> list[dict]:
    """Comparisons 1-5: each a list of (baseline, gradpower) spec pairs, one per seed."""
    base = RunSpec(steps=plan.steps, logging_steps=max(1, plan.steps // 50))

    def pairs(**kw) -> list[tuple[RunSpec, RunSpec]]:
        return _pairs(base, plan.seeds, **kw)

    return [
        {"name": "1. LLaMA AdamW vs AdamPower (cos)", "pairs": pairs(schedule="cos")},
        {"name": "2. LLaMA AdamW vs AdamPower (wsd)", "pairs": pairs()},
        {
            "name": "3. Qwen2MoE AdamW vs AdamPower (wsd)",
            "pairs": pairs(model="qwen2moe-tiny", logging_steps=1),
            "spikes": True,
        },
        {"name": "4. LLaMA Muon vs MuonPower (wsd)", "pairs": pairs(optim="muon")},
        {"name": "5. LLaMA blockwise LR: AdamW vs AdamPower (wsd)", "pairs": pairs(blockwise=True)},
    ]


def p_sweep_specs(plan: Plan) -> list[RunSpec]:
    return [
        RunSpec(optim="adampower", p=p, steps=plan.steps, logging_steps=max(1, plan.steps // 50), seed=0)
        for p in P_SWEEP
    ]


def batch_specs(plan: Plan) -> list[RunSpec]:
    out = []
    for b in BATCHES:
        steps = max(1, plan.steps * BASE_BATCH // b)
        log = max(1, steps // 50)
        out += [
            RunSpec(optim="adampower", p=p, batch=b, steps=steps, logging_steps=log, seed=0) for p in P_BATCH
        ]
    return out


def long_comparison(plan: Plan) -> dict:
    """Comparison 8: comparison 2 (LLaMA, wsd, batch 8) at ``plan.long_steps`` steps; ~100 logged losses."""
    base = RunSpec(steps=plan.long_steps, logging_steps=max(1, plan.long_steps // 100))
    return {"name": "8. LLaMA AdamW vs AdamPower, long regime (wsd)", "pairs": _pairs(base, plan.seeds)}


def long_specs(plan: Plan) -> list[RunSpec]:
    return [r for pair in long_comparison(plan)["pairs"] for r in pair]


def short_specs(plan: Plan) -> list[RunSpec]:
    """Runs of comparisons 1-7, whose length (``plan.steps``) is sized to the budget."""
    specs = [r for c in comparisons(plan) for pair in c["pairs"] for r in pair]
    return specs + p_sweep_specs(plan) + batch_specs(plan)


def all_specs(plan: Plan) -> list[RunSpec]:
    # identical runs are shared (e.g. p=1.2 wsd is in 2, 6 and 7); the long runs come last
    specs = short_specs(plan) + noise_specs(plan, long=False) + long_specs(plan) + noise_specs(plan, long=True)
    return list(dict.fromkeys(specs))


def estimate_seconds(specs: list[RunSpec], plan: Plan) -> float:
    """Predicted wall time: fixed cost per run + training steps + evaluations.

    An evaluated block costs about a third of a training sequence (forward only, no backward or update),
    i.e. ``step_time / (3 x BASE_BATCH)``; that matches the ~0.3 s measured for 64 blocks here.
    """
    eval_as_steps = (1 if plan.smoke else EVALS) * plan.max_eval_blocks / (3 * BASE_BATCH)
    return sum(
        plan.overhead + (r.cost() + eval_as_steps * MODEL_COST[r.model]) * plan.step_time for r in specs
    )


# ---------------------------------------------------------------------------------------------- runs
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


def calibrate(plan_smoke: bool, runs_dir: Path) -> tuple[float, float]:
    """(training seconds per step, fixed seconds per run) from a short tiny-LLaMA AdamW run at batch 8."""
    steps = 4 if plan_smoke else 20
    probe = Plan(smoke=True, seeds=1, steps=steps, step_time=0, overhead=0, eval_docs=10, max_eval_blocks=8)
    result, _ = execute(RunSpec(steps=steps, logging_steps=steps, seed=99), probe, runs_dir / "calibration")
    step_time = train_seconds_per_step(result["log_history"], steps)
    return step_time, max(0.5, result["wall_s"] - result["train_runtime"])


def load_plan(path: Path) -> Plan:
    """A stored plan. One written before comparison 8 existed gets the default ``long_steps`` and keeps its
    ``steps``, so its runs (keyed by steps) are all reused and only the long regime is new."""
    raw = json.loads(path.read_text())
    raw.setdefault("long_steps", SMOKE_LONG_STEPS if raw["smoke"] else LONG_STEPS)
    return Plan(**raw)


def make_plan(args) -> Plan:
    path = args.out / "plan.json"
    plan = load_plan(path) if path.exists() else None
    if plan is None or plan.smoke != args.smoke or plan.seeds != args.seeds:
        plan = new_plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".json.{os.getpid()}")
    part.write_text(json.dumps(asdict(plan), indent=1))  # also records long_steps in an older plan
    os.replace(part, path)  # atomic: parallel --only processes read it while another writes
    return plan


def new_plan(args) -> Plan:
    """Calibrate, then size the steps of comparisons 1-7 to what the budget leaves after the long regime."""
    step_time, overhead = calibrate(args.smoke, args.out / "runs")
    if args.smoke:
        return Plan(
            True, 1, 8, step_time, overhead, eval_docs=10, max_eval_blocks=8, long_steps=SMOKE_LONG_STEPS
        )
    plan = Plan(False, args.seeds, 100, step_time, overhead, eval_docs=50, max_eval_blocks=64)
    short = list(dict.fromkeys(short_specs(plan)))
    per_step = sum(r.cost() for r in short) / plan.steps * step_time  # training cost is linear in steps
    fixed = estimate_seconds(short, plan) - per_step * plan.steps  # overhead + evaluations
    budget = args.budget_min * 60 - estimate_seconds(long_specs(plan), plan) - fixed
    plan.steps = max(50, min(2000, int(budget / per_step) // 10 * 10))
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
        "n": n,
        "baseline_mean": statistics.fmean(baseline),
        "baseline_std": std(baseline),
        "gradpower_mean": statistics.fmean(gradpower),
        "gradpower_std": std(gradpower),
        "diff": diff,
        "diff_se": se,
        "exceeds_noise": None if n < 2 else abs(diff) > 2 * se,
    }


def count_spikes(
    losses: list[float],
    window: int = SPIKE_WINDOW,
    threshold: float = SPIKE_THRESHOLD,
    min_history: int = SPIKE_MIN_HISTORY,
) -> int:
    """Logged losses exceeding the median of the previous ``window`` logged losses by more than ``threshold``."""
    return sum(
        1
        for i in range(min_history, len(losses))
        if losses[i] > statistics.median(losses[max(0, i - window) : i]) + threshold
    )


def _curve(result: dict, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in result["log_history"] if key in r and "step" in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _mean_curve(results: list[dict], key: str) -> tuple[list[int], list[float]]:
    curves = [_curve(r, key) for r in results]
    steps = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    maps = [dict(zip(s, v, strict=True)) for s, v in curves]
    return steps, [statistics.fmean(m[s] for m in maps) for s in steps]


def evals_lower(baseline: list[dict], gradpower: list[dict]) -> tuple[int, int]:
    """(k, n): of the n evaluation steps logged by every run of both sides, the k where GradPower's
    mean (over seeds) eval loss is strictly below the baseline's. Shows whether a terminal difference
    holds along the way or only at the end."""
    b = dict(zip(*_mean_curve(baseline, "eval_loss"), strict=True))
    g = dict(zip(*_mean_curve(gradpower, "eval_loss"), strict=True))
    common = sorted(b.keys() & g.keys())
    return sum(g[step] < b[step] for step in common), len(common)


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


def _plot_eval_curves(name: str, base: list[dict], power: list[dict], path: Path) -> None:
    """Eval loss vs step: one thin line per seed and the mean over seeds, for both optimizers."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for results, color in ((base, "tab:blue"), (power, "tab:red")):
        label = RunSpec(**results[0]["spec"]).label
        for r in results:
            ax.plot(*_curve(r, "eval_loss"), color=color, alpha=0.35, linewidth=0.8)
        ax.plot(
            *_mean_curve(results, "eval_loss"),
            "o-",
            color=color,
            markersize=3,
            label=f"{label} (mean of {len(results)} seed(s); thin: each seed)",
        )
    ax.set(title=name, xlabel="step", ylabel="eval loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _compare_and_plot(comp: dict, results: dict[str, dict], out: Path, plot) -> tuple[dict, str]:
    """:func:`_compare`, plus the comparison's figure drawn by ``plot`` into ``out/<slug>.png``."""
    summary, row = _compare(comp, results)
    png = f"{_slug(comp['name'])}.png"
    plot(comp["name"], [results[b.key] for b, _ in comp["pairs"]], [results[g.key] for _, g in comp["pairs"]], out / png)
    return {"name": comp["name"], **summary, "png": png}, row


def _compare(comp: dict, results: dict[str, dict]) -> tuple[dict, str]:
    """(summary, Markdown table row) of one paired comparison; the row matches ``_TABLE_HEADER``."""
    base = [results[b.key] for b, _ in comp["pairs"]]
    power = [results[g.key] for _, g in comp["pairs"]]
    s = summarize_pair([r["final_eval_loss"] for r in base], [r["final_eval_loss"] for r in power])
    spikes = "-"
    if comp.get("spikes"):
        sb = [count_spikes(_curve(r, "loss")[1]) for r in base]
        sg = [count_spikes(_curve(r, "loss")[1]) for r in power]
        spikes = f"{sum(sb)} / {sum(sg)}"
        s["spikes"] = {"baseline": sb, "gradpower": sg}
    s["evals_lower"] = evals_lower(base, power)
    s["train_s_per_step"] = [
        statistics.fmean(train_seconds_per_step(r["log_history"], r["spec"]["steps"]) for r in rs)
        for rs in (base, power)
    ]
    sps = s["train_s_per_step"]
    row = (
        f"| {comp['name']} | {RunSpec(**base[0]['spec']).label} | {RunSpec(**power[0]['spec']).label} "
        f"| {s['n']} | {_fmt(s['baseline_mean'], s['baseline_std'])} "
        f"| {_fmt(s['gradpower_mean'], s['gradpower_std'])} | {s['diff']:+.4f} | {_two_se(s)} | {_flag(s)} "
        f"| {sps[0]:.3f} | {sps[1]:.3f} | {spikes} |"
    )
    return s, row


_TABLE_HEADER = [
    "| comparison | baseline | GradPower | seeds | baseline eval loss | GradPower eval loss | difference "
    "| 2 x SE | exceeds noise | s/step baseline | s/step GradPower | spikes baseline / GradPower |",
    "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
]


def _two_se(s: dict) -> str:
    return "n/a" if math.isnan(s["diff_se"]) else f"{2 * s['diff_se']:.4f}"


def _flag(s: dict) -> str:
    return "n/a (1 seed)" if s["exceeds_noise"] is None else ("**yes**" if s["exceeds_noise"] else "no")


def _direction(diff: float) -> str:
    return "AdamPower lower" if diff < 0 else ("AdamPower higher" if diff > 0 else "equal")


def _slug(name: str) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in name.lower())
    return "_".join(part for part in slug.split("_") if part)[:60]


def write_report(plan: Plan, results: dict[str, dict], out: Path, elapsed: float) -> Path:
    def regime_of(steps: int) -> str:
        return f"{steps} steps x batch {BASE_BATCH} x {SEQ_LEN} tokens = {steps * BASE_BATCH * SEQ_LEN:,} tokens per run"

    regime, long_regime = regime_of(plan.steps), regime_of(plan.long_steps)
    lines = [
        "# GradPower CPU reproduction"
        + (" (SMOKE: 1 seed, a few steps; numbers are not meaningful)" if plan.smoke else ""),
        "",
        f"- Regime of comparisons 1-6: {regime}; lr {LR:g} (x blockwise multipliers in 5), p = {P_MAIN} "
        f"unless swept; eval on {plan.max_eval_blocks} held-out blocks of {SEQ_LEN} tokens ({plan.eval_docs} docs).",
        f"- Regime of comparison 8 (long): {long_regime}; wsd, lr {LR:g}, p = {P_MAIN}, the seeds of 1-5.",
        f"- Seeds: {plan.seeds} for comparisons 1-5 and 8 (baseline and GradPower share init and data order per "
        "seed); 1 seed (seed 0) for the p sweep (6) and the batch study (7).",
        f"- Measured step time (tiny LLaMA AdamW, batch 8): {plan.step_time:.3f} s; "
        f"suite wall time of this invocation: {elapsed:.0f} s.",
        "- Terminal eval loss = eval loss of the final model. Difference = GradPower - baseline "
        "(negative: GradPower better). Noise flag: |mean paired difference| > 2 x its standard error.",
        "- s/step: training seconds per step, without the evaluations run during training "
        "((train_runtime - their eval_runtime) / steps), mean over seeds.",
        f"- Loss spikes (3): logged train losses (every step) above the median of the previous {SPIKE_WINDOW} "
        f"logged losses by more than {SPIKE_THRESHOLD} (from the {SPIKE_MIN_HISTORY + 1}th logged loss on).",
        "",
        "## Comparisons 1-5",
        "",
        *_TABLE_HEADER,
    ]
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for comp in comparisons(plan):
        summary, row = _compare_and_plot(comp, results, out, _plot_comparison)
        lines.append(row)
        summaries.append(summary)
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
        "of comparisons 1-5 are not meaningful)",
        "",
        "| p | terminal eval loss |",
        "|---:|---:|",
        *(f"| {p:g} | {v:.4f} |" for p, v in sweep),
        "",
        f"Best p: **{best_p:g}** (p=1 is AdamW).",
        "",
        "![p sweep](p_sweep.png)",
        "",
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
        *(
            f"| {b} | {st} | " + " | ".join(f"{v:.4f}" for _, v, _ in vals) + f" | {bp:g} |"
            for b, st, bp, vals in rows
        ),
        "",
        "![best p vs batch](best_p_vs_batch.png)",
        "",
    ]

    # 8. the long regime, then both regimes side by side
    comp = long_comparison(plan)
    summary, row = _compare_and_plot(comp, results, out, _plot_eval_curves)
    png = summary["png"]
    summaries.append(summary)
    lines += [
        f"## {comp['name']}: {long_regime}",
        "",
        *_TABLE_HEADER,
        row,
        "",
        f"![{comp['name']}]({png})",
        "",
    ]
    regimes = []
    for regime_name, c in (("short", comparisons(plan)[1]), ("long", comp)):
        s = next(x for x in summaries if x["name"] == c["name"])
        b0 = c["pairs"][0][0]
        epochs = results[b0.key]["log_history"][-1].get("epoch", float("nan"))
        regimes.append(
            {
                "regime": regime_name,
                "name": c["name"],
                "steps": b0.steps,
                "tokens": b0.steps * b0.batch * SEQ_LEN,
                "epochs": epochs,
                **s,
            }
        )
    lines += [
        "## Two regimes: AdamW vs AdamPower (tiny LLaMA, wsd, batch 8 x 128 tokens)",
        "",
        "Comparison 2 and comparison 8 side by side; both are paired over the same seeds. Epochs: passes over "
        "the training split of the embedded C4 sample. Evaluations lower: evaluations (all seeds' mean) where "
        "AdamPower's eval loss is below AdamW's.",
        "",
        "| regime | comparison | steps | tokens per run | epochs | AdamW eval loss | AdamPower eval loss "
        "| difference | 2 x SE | exceeds noise | direction | evaluations lower |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        *(
            f"| {r['regime']} | {r['name']} | {r['steps']} | {r['tokens']:,} | {r['epochs']:.2f} "
            f"| {_fmt(r['baseline_mean'], r['baseline_std'])} | {_fmt(r['gradpower_mean'], r['gradpower_std'])} "
            f"| {r['diff']:+.4f} | {_two_se(r)} | {_flag(r)} | {_direction(r['diff'])} "
            f"| {r['evals_lower'][0]} of {r['evals_lower'][1]} |"
            for r in regimes
        ),
        "",
    ]
    (out / "summary.json").write_text(
        json.dumps(
            {
                "plan": asdict(plan),
                "comparisons": summaries,
                "p_sweep": sweep,
                "two_regimes": regimes,
                "batch": [{"batch": b, "steps": st, "best_p": bp} for b, st, bp, _ in rows],
            },
            indent=1,
            default=str,
        )
    )
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 8 steps (12 for 8), tiny eval (< 90 s)")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget_min", type=float, default=60.0, help="target wall time of the full suite")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="train only the runs whose key contains every TEXT (no report): e.g. to run "
                        "parts of the suite in parallel processes; a later plain call writes the report")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1 (got {args.seeds})")
    if not args.budget_min > 0:
        parser.error(f"--budget_min must be > 0 minutes (got {args.budget_min:g})")
    if args.smoke:
        args.seeds = 1
    t0 = time.perf_counter()
    plan = make_plan(args)
    specs = all_specs(plan)
    if args.only:
        specs = [r for r in specs if all(text in r.key for text in args.only)]
    runs_dir = args.out / "runs"
    todo = [r for r in specs if not (runs_dir / f"{r.key}.json").exists()]
    est = estimate_seconds(todo, plan)
    print(
        f"[reproduce] {'smoke' if plan.smoke else 'full'}: {len(specs)} runs ({len(specs) - len(todo)} done), "
        f"{plan.steps} steps at batch {BASE_BATCH} ({plan.long_steps} in the long regime), {plan.seeds} seed(s); "
        f"measured {plan.step_time:.3f} s/step, "
        f"{plan.overhead:.1f} s/run overhead; estimated {est / 60:.1f} min for the {len(todo)} to run",
        flush=True,
    )
    results, done_cost, spent = {}, 0.0, 0.0
    for i, spec in enumerate(specs, 1):
        t = time.perf_counter()
        results[spec.key], ran = execute(spec, plan, runs_dir)
        if ran:
            spent += time.perf_counter() - t
            done_cost += estimate_seconds([spec], plan)
            left = [
                r for r in specs[i:] if r.key not in results and not (runs_dir / f"{r.key}.json").exists()
            ]
            remaining = estimate_seconds(left, plan) * (spent / done_cost if done_cost else 1.0)
            print(
                f"[{i}/{len(specs)}] {spec.key}: eval {results[spec.key]['final_eval_loss']:.4f} "
                f"({time.perf_counter() - t:.1f} s) | elapsed {time.perf_counter() - t0:.0f} s, "
                f"~{remaining:.0f} s remaining",
                flush=True,
            )
        else:
            print(f"[{i}/{len(specs)}] {spec.key}: cached", flush=True)
    if args.only:
        print(f"[reproduce] --only: {len(specs)} runs done, no report", flush=True)
        return runs_dir
    report = write_report(plan, results, args.out, time.perf_counter() - t0)
    print(f"[reproduce] report: {report} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
