"""The reproduction suite's ``report.md`` / ``summary.json``: the sections in order, from the cached runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

from benchmarks.reproduce_noise import noise_section
from benchmarks.reproduce_pairs import (
    _TABLE_HEADER,
    _compare_and_plot,
    _direction,
    _flag,
    _fmt,
    _plot_comparison,
    _plot_eval_curves,
    _two_se,
)
from benchmarks.reproduce_plan import (
    BASE_BATCH,
    LR,
    MACHINE,
    P_BATCH,
    P_MAIN,
    SEQ_LEN,
    SPIKE_MIN_HISTORY,
    SPIKE_THRESHOLD,
    SPIKE_WINDOW,
    Plan,
    batch_specs,
    comparisons,
    long_comparison,
)
from benchmarks.reproduce_which_p import which_p_section, write_evidence

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _missing(specs, results: dict[str, dict]) -> str | None:
    """ "not yet run (k of n)" while some of ``specs`` have no result, else None."""
    keys = list(dict.fromkeys(r.key for r in specs))
    k = sum(key in results for key in keys)
    return None if k == len(keys) else f"not yet run ({k} of {len(keys)})"


def _pair_specs(comp: dict) -> list:
    return [r for pair in comp["pairs"] for r in pair]


def write_report(plan: Plan, results: dict[str, dict], out: Path, evidence: Path | None = None) -> Path:
    """``report.md``, its figures and ``summary.json`` in ``out`` from the runs in ``results``; what has not
    run yet is listed as such. ``evidence``: where to refresh the probe's evidence table (not from smoke runs)."""

    def regime_of(steps: int) -> str:
        return f"{steps} steps x batch {BASE_BATCH} x {SEQ_LEN} tokens = {steps * BASE_BATCH * SEQ_LEN:,} tokens per run"

    regime, long_regime = regime_of(plan.steps), regime_of(plan.long_steps)
    lines = [
        "# GradPower CPU reproduction"
        + (" (SMOKE: 1 seed, a few steps; numbers are not meaningful)" if plan.smoke else ""),
        "",
        f"- Short regime (comparisons 1-5, 7, and 6 and 9-17 in part): {regime}; lr {LR:g} (x blockwise multipliers "
        f"in 5), p = {P_MAIN} unless swept; eval on {plan.max_eval_blocks} held-out blocks of {SEQ_LEN} tokens "
        f"({plan.eval_docs} docs).",
        f"- Long regime (comparison 8, and 6 and 9-17 in part): {long_regime}; wsd, lr {LR:g}.",
        f"- Seeds: {plan.seeds} for the paired comparisons (baseline and GradPower share init and data order per "
        f"seed), {plan.seeds} more for the validation in 6; 1 seed (seed 0) for the batch study (7).",
        f"- Machine: {MACHINE}. Muon's Newton-Schulz is bf16 everywhere; on a CPU without bf16 GEMM (the AMD EPYC) "
        "its products run as fp32 GEMMs of the bf16 values, which differs from torch's bf16 GEMM only in the order "
        "of the fp32 sums (docs/usage.md, Muon and MuonPower).",
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
        if missing := _missing(_pair_specs(comp), results):
            lines.append(f"| {comp['name']} | {missing} |" + " |" * 10)
            continue
        summary, row = _compare_and_plot(comp, results, out, _plot_comparison)
        lines.append(row)
        summaries.append(summary)
    lines += ["", *(f"![{c['name']}]({c['png']})" for c in summaries), ""]

    which_lines, which_summary = which_p_section(plan, results, out)
    lines += which_lines

    # 7. best p vs batch size at equal tokens
    rows = []
    if missing := _missing(batch_specs(plan), results):
        lines += ["## 7. Best p vs batch size", "", f"Batch study {missing}.", ""]
    else:
        rows = _batch_study(plan, results, out)
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
    lines += [f"## {comp['name']}: {long_regime}", ""]
    if missing := _missing(_pair_specs(comp), results):
        lines += [f"{missing}.", ""]
    else:
        summary, row = _compare_and_plot(comp, results, out, _plot_eval_curves)
        summaries.append(summary)
        lines += [*_TABLE_HEADER, row, "", f"![{comp['name']}]({summary['png']})", ""]
    regimes = []
    for regime_name, c in (("short", comparisons(plan)[1]), ("long", comp)):
        s = next((x for x in summaries if x["name"] == c["name"]), None)
        if s is not None:
            regimes.append({"regime": regime_name, **which_summary["regimes"][regime_name], **s})
    lines += [
        "## Two regimes: AdamW vs AdamPower (tiny LLaMA, wsd, batch 8 x 128 tokens)",
        "",
        "Comparison 2 and comparison 8 side by side; both are paired over the same seeds. Epochs: tokens trained "
        "/ tokens in the training split of the embedded C4 sample (section 6). Evaluations lower: evaluations "
        "(all seeds' mean) where AdamPower's eval loss is below AdamW's.",
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
    noise_lines, noise_summary = noise_section(plan, results, out, summaries)
    lines += noise_lines
    (out / "summary.json").write_text(
        json.dumps(
            {
                "plan": asdict(plan),
                "comparisons": summaries,
                "which_p": which_summary,
                "two_regimes": regimes,
                "p_schedules": noise_summary,
                "batch": [{"batch": b, "steps": st, "best_p": bp} for b, st, bp, _ in rows],
            },
            indent=1,
            default=str,
        )
    )
    if evidence is not None and not plan.smoke:
        write_evidence(which_summary, evidence)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _batch_study(plan: Plan, results: dict[str, dict], out: Path) -> list[tuple]:
    """Rows (batch, steps, best p, [(p, loss, steps)]) of comparison 7, and its figure."""
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
    fig.suptitle(f"7. AdamPower: best p vs batch size (equal tokens, 1 seed); {MACHINE}")
    fig.tight_layout()
    fig.savefig(out / "best_p_vs_batch.png", dpi=90)
    plt.close(fig)
    return rows
