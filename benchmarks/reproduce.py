"""CPU reproduction suite: GradPower vs its baseline optimizer on tiny models, paired over seeds.

    python -m benchmarks.reproduce [--smoke] [--out docs/reproduction] [--seeds 3] [--only TEXT ...]
                                   [--report_only] [--dry_run]

Every run goes through ``run_pretrain``'s own code path (``hf_gradpower.pretrain.run``) on the
embedded C4 sample. Comparisons (baseline vs GradPower, same init and data order per seed):

1. tiny LLaMA, AdamW vs AdamPower (p=1.2), cosine schedule
2. the same under WSD
3. tiny Qwen2MoE, AdamW vs AdamPower under WSD, with loss-spike counts (logging every step)
4. Muon vs MuonPower (tiny LLaMA, WSD)
5. AdamW + blockwise LR vs AdamPower + blockwise LR (tiny LLaMA, WSD)
6. which p: AdamPower p in {0.8, ..., 1.5} and MuonPower p in {0.8, ..., 1.3} (p = 1: AdamW / Muon) in
   both regimes on the paired seeds; the best mean is then validated against the baseline and p = 1.2 on
   as many fresh seeds
7. p in {0.8, 1.0, 1.2, 1.5} vs global batch {4, 8, 32} at EQUAL TOKENS (steps x batch constant; 1 seed)
8. tiny LLaMA, AdamW vs AdamPower (p=1.2) under WSD in the long regime (2000 steps instead of 230)
9-17. p schedules (ramps, ``auto``) against AdamW and p = 1.2, both regimes; MuonPower ``auto``

The plan is the suite's definition (230 and 2000 steps at batch 8, 3 seeds), the same on every machine;
full mode times a 20-step run only to print an estimate. Every run's metrics go to
``<out>/runs/<key>.json``, so an interrupted suite resumes where it stopped (existing runs are skipped), and
processes started with disjoint ``--only`` filters train parts of it in parallel.
``--smoke``: one seed, 8 steps (12 in the long regime), a 3-point p grid, tiny evaluation: the same code path
and report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.reproduce_plan import BASE_BATCH, all_specs, estimate_seconds, suite_plan
from benchmarks.reproduce_report import write_report
from benchmarks.reproduce_runs import calibrate, execute, write_plan
from hf_gradpower.probe import EVIDENCE_FILE

REPORT_DIR = Path(__file__).resolve().parent.parent / "docs" / "reproduction"  # the repository's report


def cached(plan, runs_dir: Path) -> dict[str, dict]:
    """The suite's stored results in ``runs_dir``, the validation of the sweep's choice included once the
    stored sweep is complete."""
    results: dict[str, dict] = {}
    while True:
        paths = {r.key: runs_dir / f"{r.key}.json" for r in all_specs(plan, results)}
        found = {key: json.loads(path.read_text()) for key, path in paths.items() if path.exists()}
        if found.keys() == results.keys():
            return found
        results = found


def _evidence(out: Path) -> Path | None:
    """The repository's own report refreshes the probe's evidence table shipped in the package."""
    return EVIDENCE_FILE if out.resolve() == REPORT_DIR else None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="1 seed, 8 steps (12 long), tiny eval, same code"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--budget_min",
        type=float,
        default=None,
        help="only compared with the estimate (the plan does not depend on it)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="TEXT",
        help="train only the runs whose key contains every TEXT (no report): e.g. to run "
        "parts of the suite in parallel processes; a later plain call writes the report",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: write the report from the cached runs (missing runs are listed)",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="print the plan and its estimate; train nothing"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1 (got {args.seeds})")
    if args.budget_min is not None and not args.budget_min > 0:
        parser.error(f"--budget_min must be > 0 minutes (got {args.budget_min:g})")
    t0 = time.perf_counter()
    plan = suite_plan(args.smoke, args.seeds)
    runs_dir = args.out / "runs"

    def select(results: dict[str, dict]) -> list:
        specs = all_specs(plan, results)
        return [r for r in specs if all(text in r.key for text in args.only)] if args.only else specs

    specs = select(cached(plan, runs_dir))
    if args.only and not specs:
        parser.error(
            f"--only {' '.join(args.only)} matches no run of the suite; keys look like "
            f"{all_specs(plan, {})[0].key}"
        )
    if args.report_only:
        results = cached(plan, runs_dir)
        report = write_report(plan, results, args.out, _evidence(args.out))
        print(f"[reproduce] report from {len(results)} cached runs: {report}", flush=True)
        return report
    write_plan(plan, args.out)
    speed = calibrate(plan.smoke, runs_dir)
    todo = [r for r in specs if not (runs_dir / f"{r.key}.json").exists()]
    est = estimate_seconds(todo, plan, speed) / 60
    budget = (
        ""
        if args.budget_min is None
        else (f" ({'within' if est <= args.budget_min else 'over'} the {args.budget_min:g}-minute budget)")
    )
    print(
        f"[reproduce] {'smoke' if plan.smoke else 'full'}: {len(specs)} runs ({len(specs) - len(todo)} done), "
        f"{plan.steps} steps at batch {BASE_BATCH} ({plan.long_steps} in the long regime), {plan.seeds} seed(s) "
        f"(+{plan.seeds} fresh for the validation); measured {speed.step_time:.3f} s/step, {speed.overhead:.1f} s/run "
        f"overhead: estimated {est:.1f} min for the {len(todo)} to run{budget}",
        flush=True,
    )
    if args.dry_run:
        return args.out / "plan.json"
    results: dict[str, dict] = {}
    while todo := [r for r in specs if r.key not in results]:  # the sweep's choice adds its validation runs
        for spec in todo:
            t = time.perf_counter()
            results[spec.key], ran = execute(spec, plan, runs_dir)
            state = (
                f"eval {results[spec.key]['final_eval_loss']:.4f} ({time.perf_counter() - t:.1f} s)"
                if ran
                else "cached"
            )
            print(f"[{len(results)}/{len(specs)}] {spec.key}: {state}", flush=True)
        specs = select(results | cached(plan, runs_dir))  # other processes' runs count for the choice
    if args.only:
        print(f"[reproduce] --only: {len(specs)} runs done, no report", flush=True)
        return runs_dir
    report = write_report(plan, results, args.out, _evidence(args.out))
    print(f"[reproduce] report: {report} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
