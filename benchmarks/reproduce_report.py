"""The reproduction suite's statistics, figures and ``report.md`` / ``summary.json``."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

import matplotlib

from benchmarks.reproduce_plan import (
    BASE_BATCH,
    LR,
    P_BATCH,
    P_MAIN,
    SEQ_LEN,
    SPIKE_MIN_HISTORY,
    SPIKE_THRESHOLD,
    SPIKE_WINDOW,
    Plan,
    RunSpec,
    batch_specs,
    comparisons,
    long_comparison,
    p_sweep_specs,
)
from benchmarks.reproduce_runs import train_seconds_per_step

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    from benchmarks.reproduce_noise import noise_section  # it builds on this module's helpers

    noise_lines, noise_summary = noise_section(plan, results, out, summaries)
    lines += noise_lines
    (out / "summary.json").write_text(
        json.dumps(
            {
                "plan": asdict(plan),
                "comparisons": summaries,
                "p_sweep": sweep,
                "two_regimes": regimes,
                "p_schedules": noise_summary,
                "batch": [{"batch": b, "steps": st, "best_p": bp} for b, st, bp, _ in rows],
            },
            indent=1,
            default=str,
        )
    )
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
