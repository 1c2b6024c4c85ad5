"""Report section for comparisons 9-17: p schedules and ``auto`` p against AdamW / fixed p, both regimes.

Adds a table of every optimizer variant per regime (paired over the same seeds against AdamW and against
AdamPower p = 1.2), a verdict per regime computed from that table, and a figure of the measured noise
scale over training beside the p that ``auto`` chose.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from benchmarks.reproduce_pairs import (
    _compare_and_plot,
    _flag,
    _fmt,
    _mean_curve,
    _plot_eval_curves,
    _two_se,
    final_eval_losses,
    summarize_pair,
)
from benchmarks.reproduce_plan import (
    BASE_BATCH,
    MACHINE,
    P_RAMP,
    P_RAMPS_FIXED,
    Plan,
    comparisons,
    long_comparison,
    noise_comparisons,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURE = "noise_and_auto_p.png"


def _variants(plan: Plan, long: bool, results: dict[str, dict]) -> dict[str, list]:
    """Per variant, its runs (one per seed, same seeds in every variant) for one regime; only variants whose
    runs have all finished."""
    fixed = long_comparison(plan) if long else comparisons(plan)[1]  # AdamW vs AdamPower p=1.2 (wsd)
    out = {"AdamW": [b for b, _ in fixed["pairs"]], "AdamPower p=1.2": [g for _, g in fixed["pairs"]]}
    for comp in noise_comparisons(plan, long):
        if comp["variant"].startswith("Muon"):
            out["Muon"] = [b for b, _ in comp["pairs"]]
        out[comp["variant"]] = [g for _, g in comp["pairs"]]
    return {name: runs for name, runs in out.items() if all(r.key in results for r in runs)}


def _row(regime: str, name: str, runs, base_runs, fixed_runs, results) -> tuple[str, dict, dict | None]:
    """Table row of a variant: its eval loss, and paired differences vs its baseline and (Adam family) p = 1.2."""
    losses = final_eval_losses(runs, results)
    vs_base = summarize_pair(final_eval_losses(base_runs, results), losses)
    vs_fixed = None if name.startswith("Muon") else summarize_pair(final_eval_losses(fixed_runs, results), losses)

    def cells(s: dict | None, reference: bool) -> str:
        return (
            "reference | | "
            if reference
            else ("- | | " if s is None else f"{s['diff']:+.4f} | {_two_se(s)} | {_flag(s)}")
        )

    mean_std = _fmt(vs_base["gradpower_mean"], vs_base["gradpower_std"])
    row = (
        f"| {regime} | {name} | {mean_std} | {cells(vs_base, name in ('AdamW', 'Muon'))} "
        f"| {cells(vs_fixed, name == 'AdamPower p=1.2')} |"
    )
    return row, vs_base, vs_fixed


def noise_section(
    plan: Plan, results: dict[str, dict], out: Path, summaries: list[dict]
) -> tuple[list[str], dict]:
    """Markdown lines of the section and its summary (for summary.json); draws the figures."""
    lines = [
        "## 9-17. p schedules and auto p, both regimes",
        "",
        f"- Ramp: `--gradpower_p {P_RAMP}` (linear over the run); fixed-length ramps: "
        + ", ".join(f"`--gradpower_p {spec}`" for spec in P_RAMPS_FIXED)
        + " (linear over the first 400 steps, "
        "then 1.2). Auto: `--gradpower_p auto` (p per param group "
        "every 10 steps from the measured noise through Example 4.1, clamped to [0.9, 1.2]; 1.0 until the "
        f"first decision); its runs use 2 micro-batches of 4 (same global batch {BASE_BATCH}) so that the "
        "noise is measurable.",
        "- Each variant is paired over the same seeds against AdamW (Muon for MuonPower) and against AdamPower "
        "p = 1.2; difference = variant - reference (negative: the variant is better).",
        "",
    ]
    missing = []
    for comp in [*noise_comparisons(plan, long=False), *noise_comparisons(plan, long=True)]:
        runs = [r for pair in comp["pairs"] for r in pair]
        if not all(r.key in results for r in runs):
            missing.append(
                f"{comp['name']}: not yet run ({sum(r.key in results for r in runs)} of {len(runs)})"
            )
            continue
        summary, _ = _compare_and_plot(comp, results, out, _plot_eval_curves)
        summaries.append(summary)
    table = [
        "| regime | optimizer | eval loss | vs AdamW (Muon) | 2 x SE | exceeds noise | vs p=1.2 | 2 x SE "
        "| exceeds noise |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    verdicts, summary = [], {}
    for regime, long in (("short", False), ("long", True)):
        variants = _variants(plan, long, results)
        for name, runs in variants.items():
            base = variants.get("Muon" if name.startswith("Muon") else "AdamW")
            if base is None or "AdamPower p=1.2" not in variants:
                continue
            row, vs_base, vs_fixed = _row(regime, name, runs, base, variants["AdamPower p=1.2"], results)
            table.append(row)
            summary[f"{regime}/{name}"] = {"vs_baseline": vs_base, "vs_p1.2": vs_fixed}
        auto = summary.get(f"{regime}/AdamPower p=auto")
        if auto is None:
            verdicts.append(f"- **{regime} regime**: the auto runs have not finished (see below).")
            continue
        verdicts.append(
            f"- **{regime} regime**: auto vs AdamW {auto['vs_baseline']['diff']:+.4f} "
            f"(2 x SE {_two_se(auto['vs_baseline'])}): "
            + (
                "**worse beyond seed noise**"
                if _worse(auto["vs_baseline"])
                else "not worse beyond seed noise"
            )
            + f"; auto vs p = 1.2 {auto['vs_p1.2']['diff']:+.4f} (2 x SE {_two_se(auto['vs_p1.2'])})."
        )
    verdicts += _criterion(summary)
    if missing:
        verdicts.append(
            "- The suite trains these on its next call, resuming from the cached runs: "
            + "; ".join(missing)
            + "."
        )
        verdicts += _partial(plan, results)
    lines += [*table, "", "Verdict (computed from the table):", "", *verdicts, ""]
    _plot_noise(plan, results, out / FIGURE)
    lines += [
        f"![noise scale and auto p]({FIGURE})",
        "",
        "The noise scale B_simple (EMA ratio tr(Sigma)/|G|^2, in sequences; the batch is "
        f"{BASE_BATCH}) measured along the auto runs, and the p auto chose (mean over parameters), both "
        "averaged over seeds.",
        "",
    ]
    return lines, summary


def _worse(s: dict) -> bool:
    return s["diff"] > 0 and s["exceeds_noise"]


def _criterion(summary: dict) -> list[str]:
    """The test each AdamPower schedule is held to: never worse than AdamW beyond seed noise in either regime,
    and not worse than fixed p = 1.2 beyond seed noise in the long regime."""
    names = sorted(
        {k.split("/", 1)[1] for k in summary} - {"AdamW", "AdamPower p=1.2", "Muon", "MuonPower p=auto"}
    )
    out = []
    for name in names:
        short, long = summary.get(f"short/{name}"), summary.get(f"long/{name}")
        if short is None or long is None:
            continue
        fails = [
            what
            for what, bad in (
                ("loses to AdamW in the short regime", _worse(short["vs_baseline"])),
                ("loses to AdamW in the long regime", _worse(long["vs_baseline"])),
                ("loses to p = 1.2 in the long regime", _worse(long["vs_p1.2"])),
            )
            if bad
        ]
        out.append(
            f"- Test (never worse than AdamW, not worse than p = 1.2 in the long regime, each beyond seed noise)"
            f", {name}: " + ("**met**" if not fails else "not met: " + ", ".join(fails)) + "."
        )
    return out


def _partial(plan: Plan, results: dict[str, dict]) -> list[str]:
    """Finished runs of unfinished comparisons, beside the same seed's AdamW / Muon and p = 1.2 (no verdict)."""
    out = []
    for long in (False, True):
        fixed = long_comparison(plan) if long else comparisons(plan)[1]
        for comp in noise_comparisons(plan, long):
            for (base, run), (_, p12) in zip(comp["pairs"], fixed["pairs"], strict=True):
                if (
                    run.key in results
                    and base.key in results
                    and p12.key in results
                    and not all(g.key in results for _, g in comp["pairs"])
                ):
                    ref = f"{base.label} {results[base.key]['final_eval_loss']:.4f}"
                    if not run.optim.startswith("muon"):
                        ref += f", {p12.label} {results[p12.key]['final_eval_loss']:.4f}"
                    out.append(
                        f"  - finished alone (1 seed, no verdict): {run.label}, {run.steps} steps, seed "
                        f"{run.seed}: eval loss {results[run.key]['final_eval_loss']:.4f} (same seed: {ref})"
                    )
    return out


def _plot_noise(plan: Plan, results: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, long in zip(axes, (False, True), strict=True):
        twin = ax.twinx()
        comps = {c["variant"]: c for c in noise_comparisons(plan, long)}
        for name, color in (("AdamPower p=auto", "tab:blue"), ("MuonPower p=auto", "tab:red")):
            comp = comps.get(name)
            # every finished auto run (all seeds when the comparison is complete), for the curve
            runs = [results[g.key] for _, g in (comp or {"pairs": []})["pairs"] if g.key in results]
            if runs:
                ax.plot(*_mean_curve(runs, "noise/b_simple"), color=color, label=f"B_simple, {name}")
                twin.plot(*_mean_curve(runs, "gradpower_p"), "--", color=color, label=f"p, {name}")
        ax.axhline(BASE_BATCH, color="gray", lw=0.8, ls=":", label=f"batch ({BASE_BATCH})")
        ax.set(
            xlabel="step",
            ylabel="B_simple (sequences)",
            title=f"{'long' if long else 'short'} regime ({plan.long_steps if long else plan.steps} steps)",
        )
        twin.set_ylabel("p chosen by auto (dashed)")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Measured gradient noise scale and the p auto chose (tiny LLaMA, wsd, mean over seeds); {MACHINE}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
