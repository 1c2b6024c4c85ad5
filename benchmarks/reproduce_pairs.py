"""Paired comparisons of the reproduction suite: statistics over seeds, table rows and figures, shared by
the report's sections."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

from benchmarks.reproduce_plan import MACHINE, SPIKE_MIN_HISTORY, SPIKE_THRESHOLD, SPIKE_WINDOW, RunSpec
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
    fig.text(0.99, 0.005, MACHINE, ha="right", va="bottom", fontsize=6, color="gray")
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
    fig.text(0.99, 0.005, MACHINE, ha="right", va="bottom", fontsize=6, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _compare_and_plot(comp: dict, results: dict[str, dict], out: Path, plot) -> tuple[dict, str]:
    """:func:`_compare`, plus the comparison's figure drawn by ``plot`` into ``out/<slug>.png``."""
    summary, row = _compare(comp, results)
    png = f"{_slug(comp['name'])}.png"
    plot(
        comp["name"],
        [results[b.key] for b, _ in comp["pairs"]],
        [results[g.key] for _, g in comp["pairs"]],
        out / png,
    )
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


def final_eval_losses(specs, results) -> list[float]:
    """Each run's final evaluation loss, in the order of ``specs``."""
    return [results[s.key]["final_eval_loss"] for s in specs]
