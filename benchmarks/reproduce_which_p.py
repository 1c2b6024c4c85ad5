"""Report section for comparison 6, which p: the sweep on the paired seeds, its choice, the validation on
fresh seeds, a verdict per optimizer and regime, and the evidence table the probe ships with.

Selection rule: the p with the lowest mean final eval loss over the sweep seeds (grid with p = 1, the
baseline, included). Validation: the baseline, p = 1.2 and that p on as many fresh seeds. Recommended: of
p = 1.2 and the choice, those beating the baseline beyond seed noise on the fresh seeds, the lower mean;
otherwise the baseline (p = 1). Until the validation is complete the recommendation rests on p = 1.2 vs
the baseline on the sweep seeds, and says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

import matplotlib

from benchmarks.reproduce_pairs import _flag, _fmt, _two_se, final_eval_losses, summarize_pair
from benchmarks.reproduce_plan import (
    BASE_BATCH,
    BASELINE,
    MACHINE,
    OPTIM_NAMES,
    P_GRID,
    P_MAIN,
    REGIMES,
    SEQ_LEN,
    Plan,
    fresh_seeds,
    p_grid,
    p_runs,
    regime_base,
    select_p,
    sweep_seeds,
    validation_ps,
)
from benchmarks.reproduce_runs import train_split_tokens
from hf_gradpower.probe import Evidence

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURE = "p_sweep.png"


def _done(runs_by_p: dict, results) -> tuple[int, int]:
    runs = [r for rs in runs_by_p.values() for r in rs]
    return sum(r.key in results for r in runs), len(runs)


def _span(seeds) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else f"{seeds[0]}"


def _not_yet(k: int, n: int) -> str:
    return f"not yet run ({k} of {n})"


def _wins(s: dict | None) -> bool:
    return s is not None and s["diff"] < 0 and bool(s["exceeds_noise"])


def _outcome(s: dict) -> str:
    if _wins(s):
        return "**holds** (better beyond seed noise)"
    if s["diff"] > 0 and s["exceeds_noise"]:
        return "**does not hold: worse** beyond seed noise"
    return "**does not hold**: within seed noise"


def _cells(s: dict | None) -> str:
    """Table cells: paired difference | 2 x SE | exceeds noise (empty without a comparison)."""
    return "| |" if s is None else f"{s['diff']:+.4f} | {_two_se(s)} | {_flag(s)}"


def _diff(s: dict) -> str:
    return f"{s['diff']:+.4f} (2 x SE {_two_se(s)})"


def study(plan: Plan, optim: str, long: bool, results: dict[str, dict]) -> dict:
    """Sweep, choice, validation and recommendation of one optimizer in one regime (JSON-ready)."""
    base_name = OPTIM_NAMES[BASELINE[optim]]
    sweep = p_runs(plan, optim, long, p_grid(plan, optim), sweep_seeds(plan))
    grid = {}
    for p, runs in sweep.items():
        k = sum(r.key in results for r in runs)
        row = {"done": k, "n": len(runs)}
        if k == len(runs):
            losses = final_eval_losses(runs, results)
            row |= {
                "mean": statistics.fmean(losses),
                "se": statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else float("nan"),
            }
            if all(r.key in results for r in sweep[1.0]):
                row["vs_baseline"] = summarize_pair(final_eval_losses(sweep[1.0], results), losses)
        grid[f"{p:g}"] = row
    selected = select_p(plan, optim, long, results)
    fresh = p_runs(plan, optim, long, validation_ps(selected), fresh_seeds(plan))
    k, n = _done(fresh, results)
    validation = {"seeds": list(fresh_seeds(plan)), "done": k, "n": n}
    if selected is not None and k == n:
        base = final_eval_losses(fresh[1.0], results)
        validation["mean"] = {f"{p:g}": statistics.fmean(final_eval_losses(runs, results)) for p, runs in fresh.items()}
        validation["vs_baseline"] = {
            f"{p:g}": summarize_pair(base, final_eval_losses(runs, results)) for p, runs in fresh.items() if p != 1.0
        }
        if selected not in (1.0, P_MAIN):
            validation["selected_vs_p1.2"] = summarize_pair(
                final_eval_losses(fresh[P_MAIN], results), final_eval_losses(fresh[selected], results)
            )
    out = {
        "optimizer": optim,
        "baseline": BASELINE[optim],
        "regime": "long" if long else "short",
        "steps": regime_base(plan, long).steps,
        "sweep_seeds": list(sweep_seeds(plan)),
        "grid": grid,
        "sweep_done": _done(sweep, results),
        "selected_p": selected,
        "validation": validation,
    }
    out |= _recommend(out, base_name)
    return out


def _recommend(s: dict, base_name: str) -> dict:
    """``recommended_p``, ``validated`` and ``basis`` (words) from a :func:`study`."""
    v = s["validation"]
    if "vs_baseline" in v:
        seeds = f"fresh seeds {_span(v['seeds'])}"
        wins = {float(p): v["mean"][p] for p, d in v["vs_baseline"].items() if _wins(d)}
        if wins:
            p = min(wins, key=wins.get)
            d = v["vs_baseline"][f"{p:g}"]
            return {
                "recommended_p": p,
                "validated": True,
                "basis": f"p = {p:g} vs {base_name} {_diff(d)} on {seeds}",
            }
        d = v["vs_baseline"][f"{P_MAIN:g}"]
        return {
            "recommended_p": 1.0,
            "validated": True,
            "basis": f"no p beat {base_name} beyond seed noise on {seeds} (p = {P_MAIN:g}: {_diff(d)})",
        }
    vs = s["grid"][f"{P_MAIN:g}"].get("vs_baseline")
    if vs is None:
        return {"recommended_p": None, "validated": False, "basis": None}
    return {
        "recommended_p": P_MAIN if _wins(vs) else 1.0,
        "validated": False,
        "basis": f"p = {P_MAIN:g} vs {base_name} {_diff(vs)} over seeds {_span(s['sweep_seeds'])}, "
        "not yet validated on fresh seeds",
    }


def verdict(s: dict) -> str:
    """One paragraph per optimizer and regime, in words that follow the numbers."""
    name, base = OPTIM_NAMES[s["optimizer"]], OPTIM_NAMES[s["baseline"]]
    head = f"- **{name}, {s['regime']} regime ({s['steps']} steps)**: "
    k, n = s["sweep_done"]
    if s["selected_p"] is None:
        return head + f"sweep {_not_yet(k, n)}." + _fallback(s)
    p = s["selected_p"]
    row = s["grid"][f"{p:g}"]
    words = head + (
        f"the sweep selects p = {p:g} (mean {row['mean']:.4f} over seeds {_span(s['sweep_seeds'])}"
        + ("; the baseline itself" if p == 1.0 else f", vs {base} {_diff(row['vs_baseline'])}")
        + "). "
    )
    v = s["validation"]
    if "vs_baseline" not in v:
        return words + f"Validation on fresh seeds {_not_yet(v['done'], v['n'])}." + _fallback(s)
    seeds = f"fresh seeds {_span(v['seeds'])}"
    if p != 1.0:
        d = v["vs_baseline"][f"{p:g}"]
        words += f"On {seeds}, p = {p:g} vs {base} {_diff(d)}: the choice {_outcome(d)}. "
    else:
        words += f"On {seeds}: "
    if p != P_MAIN:
        words += f"p = {P_MAIN:g} vs {base} {_diff(v['vs_baseline'][f'{P_MAIN:g}'])}. "
    if "selected_vs_p1.2" in v:
        words += f"p = {p:g} vs p = {P_MAIN:g} {_diff(v['selected_vs_p1.2'])}. "
    return (
        words
        + f"Use **p = {s['recommended_p']:g}**"
        + (f" (plain {base})" if s["recommended_p"] == 1.0 else "")
        + "."
    )


def _fallback(s: dict) -> str:
    if s["recommended_p"] is None:
        return " No evidence for this regime yet."
    plain = f" (plain {OPTIM_NAMES[s['baseline']]})" if s["recommended_p"] == 1.0 else ""
    return f" Until then the evidence supports p = {s['recommended_p']:g}{plain}: {s['basis']}."


def _plot(plan: Plan, studies: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(len(P_GRID), len(REGIMES), figsize=(10, 7), squeeze=False)
    for i, optim in enumerate(P_GRID):
        for j, (regime, _) in enumerate(REGIMES):
            s, ax = studies[f"{optim}/{regime}"], axes[i][j]
            pts = [(float(p), r["mean"], 2 * r["se"]) for p, r in s["grid"].items() if "mean" in r]
            if pts:
                ax.errorbar(*zip(*pts, strict=True), fmt="o-", capsize=3, label="sweep seeds (mean, 2 x SE)")
            means = s["validation"].get("mean", {})
            if means:
                ax.plot(
                    [float(p) for p in means],
                    list(means.values()),
                    "s",
                    color="tab:red",
                    label="fresh seeds (mean)",
                )
            if s["selected_p"] is not None:
                ax.axvline(s["selected_p"], color="gray", ls=":", label=f"selected p = {s['selected_p']:g}")
            k, n = s["sweep_done"]
            ax.set(
                title=f"{OPTIM_NAMES[optim]}, {regime} ({s['steps']} steps)"
                + ("" if k == n else f": {k} of {n} runs"),
                xlabel=f"p (1 = {OPTIM_NAMES[s['baseline']]})",
                ylabel="final eval loss",
            )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"Eval loss against p (tiny LLaMA, wsd, batch {BASE_BATCH} x {SEQ_LEN})\n{MACHINE}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def regimes(plan: Plan) -> dict[str, dict]:
    """Tokens per run, per parameter and epochs over the training split (seed 0's held-out documents)."""
    from hf_gradpower.model_configs import count_parameters, load_model_config

    params = count_parameters(load_model_config(regime_base(plan, False).model))["total"]
    with contextlib.redirect_stderr(io.StringIO()):  # the datasets progress bars
        split = train_split_tokens(plan.eval_docs, 0)
    out = {}
    for regime, long in REGIMES:
        steps = regime_base(plan, long).steps
        tokens = steps * BASE_BATCH * SEQ_LEN
        out[regime] = {
            "steps": steps,
            "tokens": tokens,
            "parameters": params,
            "tokens_per_param": tokens / params,
            "batch_tokens": BASE_BATCH * SEQ_LEN,
            "train_split_tokens": split,
            "epochs": tokens / split,
        }
    return out


def which_p_section(plan: Plan, results: dict[str, dict], out: Path) -> tuple[list[str], dict]:
    """Markdown lines of the section and its summary (for summary.json); draws the figure."""
    reg = regimes(plan)
    studies = {
        f"{optim}/{regime}": study(plan, optim, long, results) for optim in P_GRID for regime, long in REGIMES
    }
    _plot(plan, studies, out / FIGURE)
    lines = [
        "## 6. Which p: sweeps in both regimes, validated on fresh seeds",
        "",
        f"- Grid: AdamPower p in {{{', '.join(f'{p:g}' for p in p_grid(plan, 'adampower'))}}}, MuonPower p in "
        f"{{{', '.join(f'{p:g}' for p in p_grid(plan, 'muonpower'))}}}; p = 1 is AdamW / Muon itself (AdamPower "
        f"p = 1 computes the same update as AdamW). Tiny LLaMA, wsd, lr as above, batch {BASE_BATCH} x {SEQ_LEN}.",
        f"- Selection: the p with the lowest mean final eval loss over seeds {_span(sweep_seeds(plan))}. "
        f"Validation: the baseline, p = {P_MAIN:g} and the selected p on fresh seeds ({_span(fresh_seeds(plan))}) "
        "that played no part in the choice; "
        "differences are paired per seed (p - baseline; negative: p is better), noise flag |mean| > 2 x SE.",
        "",
        "| regime | steps | tokens per run | tokens per parameter | training split (tokens) | epochs |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r} | {v['steps']} | {v['tokens']:,} | {v['tokens_per_param']:.3f} | {v['train_split_tokens']:,} "
            f"| {v['epochs']:.2f} |"
            for r, v in reg.items()
        ),
        "",
        f"Epochs = tokens trained / tokens in the training split of the embedded C4 sample ({plan.eval_docs} "
        "documents held out, seed 0's split); the long regime repeats the data, so its losses measure "
        "fitting a small corpus several times over as much as learning from fresh text.",
        "",
        "### Sweep (selection seeds)",
        "",
        "| optimizer | regime | p | eval loss (mean ± std) | vs baseline (paired) | 2 x SE | exceeds noise |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in studies.values():
        for p, row in s["grid"].items():
            label = f"{p}" + (f" ({OPTIM_NAMES[s['baseline']]})" if float(p) == 1.0 else "")
            label += " **selected**" if s["selected_p"] is not None and f"{s['selected_p']:g}" == p else ""
            if "mean" not in row:
                lines.append(
                    f"| {OPTIM_NAMES[s['optimizer']]} | {s['regime']} | {label} | {_not_yet(row['done'], row['n'])} "
                    "| | | |"
                )
                continue
            std = row["se"] * math.sqrt(row["n"])
            vs = row.get("vs_baseline")
            cells = "reference | |" if float(p) == 1.0 else _cells(vs)
            lines.append(
                f"| {OPTIM_NAMES[s['optimizer']]} | {s['regime']} | {label} | {_fmt(row['mean'], std)} | {cells} |"
            )
    lines += [
        "",
        f"![eval loss against p]({FIGURE})",
        "",
        "Mean final eval loss against p per optimizer and regime (error bars: 2 x SE of the mean over the "
        "selection seeds; the table's paired differences remove the part of that spread the p values share); "
        "squares: the fresh seeds' means.",
        "",
        "### Validation on fresh seeds",
        "",
        "| optimizer | regime | p | eval loss (mean) | vs baseline (paired) | 2 x SE | exceeds noise "
        f"| vs p = {P_MAIN:g} (paired) | 2 x SE | exceeds noise |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for s in studies.values():
        v = s["validation"]
        name, regime = OPTIM_NAMES[s["optimizer"]], s["regime"]
        if "vs_baseline" not in v:
            what = "the sweep's choice: after the sweep" if s["selected_p"] is None else ""
            lines.append(f"| {name} | {regime} | | {_not_yet(v['done'], v['n'])} | {what} | | | | | |")
            continue
        for p, mean in v["mean"].items():
            selected = f"{s['selected_p']:g}" == p
            vs_base = "reference | |" if float(p) == 1.0 else _cells(v["vs_baseline"][p])
            vs_fixed = _cells(v.get("selected_vs_p1.2") if selected else None)
            label = f"{p} ({OPTIM_NAMES[s['baseline']]})" if float(p) == 1.0 else p
            tag = " (selected)" if selected else ""
            lines.append(f"| {name} | {regime} | {label}{tag} | {mean:.4f} | {vs_base} | {vs_fixed} |")
    lines += ["", "Verdict (computed from the tables):", "", *(verdict(s) for s in studies.values()), ""]
    summary = {
        "rule": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        "regimes": reg,
        "studies": studies,
    }
    return lines, summary


def evidence(summary: dict) -> list[Evidence]:
    """The probe's entries for our runs: one per optimizer and regime with a recommendation."""
    out = []
    for s in summary["studies"].values():
        if s["recommended_p"] is None:
            continue
        r = summary["regimes"][s["regime"]]
        out.append(
            Evidence(
                source="ours",
                optimizer=s["optimizer"],
                regime=s["regime"],
                setting=f"our CPU runs, {s['regime']} regime: {r['steps']} steps of tiny LLaMA "
                f"({r['parameters'] / 1e6:.1f}M parameters) at batch {BASE_BATCH} x {SEQ_LEN} tokens on the embedded C4 "
                f"sample ({r['epochs']:.2g} epochs)",
                tokens_per_param=round(r["tokens_per_param"], 4),
                batch_tokens=r["batch_tokens"],
                p=s["recommended_p"],
                validated=s["validated"],
                basis=s["basis"],
            )
        )
    return out


def write_evidence(summary: dict, path: Path) -> None:
    """Refresh the evidence table shipped in the package (read by ``python -m hf_gradpower.probe``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(e) for e in evidence(summary)], indent=1) + "\n")
