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
import json
import time
from pathlib import Path

from benchmarks.reproduce_plan import BASE_BATCH, all_specs, estimate_seconds
from benchmarks.reproduce_report import write_report
from benchmarks.reproduce_runs import execute, make_plan


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 8 steps (12 for 8), tiny eval (< 90 s)")
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget_min", type=float, default=60.0, help="target wall time of the full suite")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="train only the runs whose key contains every TEXT (no report): e.g. to run "
                        "parts of the suite in parallel processes; a later plain call writes the report")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: write the report from the cached runs (unfinished comparisons 9-13 "
                        "are listed as not run)")
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
    if args.report_only:
        results = {r.key: json.loads((runs_dir / f"{r.key}.json").read_text())
                   for r in specs if (runs_dir / f"{r.key}.json").exists()}
        report = write_report(plan, results, args.out, time.perf_counter() - t0)
        print(f"[reproduce] report from {len(results)} cached runs of {len(specs)}: {report}", flush=True)
        return report
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
