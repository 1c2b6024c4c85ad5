"""The reproduction suite's plan: which runs (``RunSpec``), how long (``Plan``), paired into comparisons.

Part of ``python -m benchmarks.reproduce`` (see that module for the suite); run keys name the result files
in ``<out>/runs``, so changing a key's format orphans stored runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

LR = 1e-3
# where the stored runs were trained (named in the figures; a run's file does not record its machine)
MACHINE = "2-core x86 CPUs (the which-p runs: AMD EPYC, AVX2 only, KVM guest)"
P_MAIN = 1.2
# Which p: the grid swept per GradPower optimizer; p = 1 is the baseline optimizer itself (AdamPower p = 1 is
# bit-identical to AdamW), so it is swept as AdamW / Muon
P_GRID = {"adampower": (0.8, 0.9, 1.1, 1.2, 1.3, 1.5), "muonpower": (0.8, 0.9, 1.1, 1.2, 1.3)}
SMOKE_P_GRID = (0.9, 1.2)  # smoke: the same selection and validation code on a 3-point grid
BASELINE = {"adampower": "adamw", "muonpower": "muon"}
OPTIM_NAMES = {"adamw": "AdamW", "adampower": "AdamPower", "muon": "Muon", "muonpower": "MuonPower"}
REGIMES = (("short", False), ("long", True))
P_BATCH = (0.8, 1.0, 1.2, 1.5)
BATCHES = (4, 8, 32)
BASE_BATCH = 8
SEQ_LEN = 128
STEPS = 230  # the short regime (comparisons 1-5, 7, and the short half of 6 and 9-17), at batch 8
LONG_STEPS = 2000  # the long regime: where AdamPower p = 1.2 overtakes AdamW (from ~400 steps on)
SMOKE_STEPS = 8
SMOKE_LONG_STEPS = 12  # differs from the smoke steps, so the smoke suite trains the long regime's own runs
EVALS = 10  # evaluations along each full-mode run (smoke: only the final one)
P_RAMP = "linear:0.9:1.2"  # comparisons 9/12: p from below 1 up to the paper's default over the whole run
# comparisons 14-17: ramps over a fixed 400 steps, then p = 1.2: in the long runs p = 1.2 loses to AdamW until
# ~300 steps and leads from 400 on (eval every 200 steps, all 3 seeds), so the ramps end where 1.2 starts to pay;
# from 0.9 and from 1.0 (AdamW)
P_RAMPS_FIXED = ("linear:0.9:1.2:400", "linear:1.0:1.2:400")
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
        name = OPTIM_NAMES[self.optim]
        if self.p is not None:
            name += f" p={self.p:g}"
        if self.p_spec is not None:
            name += f" p={self.p_spec}"
        return name + (" +blockwise LR" if self.blockwise else "")

    def cost(self) -> float:
        """Estimated steps-equivalent of tiny LLaMA AdamW at batch 8."""
        return self.steps * self.batch / BASE_BATCH * MODEL_COST[self.model] * OPTIM_COST.get(self.optim, 1.0)


@dataclass(frozen=True)
class Plan:
    """What the suite trains, fixed by its definition (:func:`suite_plan`), the same on every machine."""

    smoke: bool
    seeds: int  # paired seeds of every comparison; the which-p validation uses the next ``seeds`` seeds
    steps: int  # the short regime, at batch 8; equal tokens for other batch sizes
    eval_docs: int
    max_eval_blocks: int
    long_steps: int = LONG_STEPS  # the long regime, at batch 8


@dataclass(frozen=True)
class Speed:
    """Measured speed of this machine: only for the time estimate, never for the plan."""

    step_time: float  # seconds per tiny-LLaMA AdamW step at batch 8
    overhead: float  # seconds of fixed cost per run (data, model build, save)


def suite_plan(smoke: bool, seeds: int) -> Plan:
    if smoke:
        return Plan(True, 1, SMOKE_STEPS, eval_docs=10, max_eval_blocks=8, long_steps=SMOKE_LONG_STEPS)
    return Plan(False, seeds, STEPS, eval_docs=50, max_eval_blocks=64, long_steps=LONG_STEPS)


# --------------------------------------------------------------------------------------------- plan
def regime_base(plan: Plan, long: bool) -> RunSpec:
    """Tiny LLaMA, AdamW, wsd, batch 8 in the short or the long regime (~50 / ~100 logged losses)."""
    steps = plan.long_steps if long else plan.steps
    return RunSpec(steps=steps, logging_steps=max(1, steps // (100 if long else 50)))


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
    """Comparisons 9-17: p schedules (ramps, auto) against the baseline, short regime and long regime."""
    base = regime_base(plan, long)
    tag = "long" if long else "short"
    comps = [
        {
            "name": f"{'12' if long else '9'}. LLaMA AdamW vs AdamPower p ramp ({tag}, wsd)",
            "variant": f"AdamPower p={P_RAMP}",
            "pairs": _pairs(base, plan.seeds, power={"p": None, "p_spec": P_RAMP}),
        },
        {
            "name": f"{'13' if long else '10'}. LLaMA AdamW vs AdamPower p auto ({tag}, wsd)",
            "variant": "AdamPower p=auto",
            "pairs": _pairs(base, plan.seeds, power=AUTO),
        },
    ]
    for i, spec in enumerate(P_RAMPS_FIXED):
        comps.append(
            {
                "name": f"{15 + 2 * i if long else 14 + 2 * i}. LLaMA AdamW vs AdamPower p={spec} ({tag}, wsd)",
                "variant": f"AdamPower p={spec}",
                "pairs": _pairs(base, plan.seeds, power={"p": None, "p_spec": spec}),
            }
        )
    if not long:
        comps.append(
            {
                "name": "11. LLaMA Muon vs MuonPower p auto (short, wsd)",
                "variant": "MuonPower p=auto",
                "pairs": _pairs(base, plan.seeds, power=AUTO, optim="muon"),
            }
        )
    return comps


def noise_specs(plan: Plan, long: bool) -> list[RunSpec]:
    return [r for c in noise_comparisons(plan, long) for pair in c["pairs"] for r in pair]


def comparisons(plan: Plan) -> list[dict]:
    """Comparisons 1-5: each a list of (baseline, gradpower) spec pairs, one per seed."""
    base = regime_base(plan, long=False)

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
    return {
        "name": "8. LLaMA AdamW vs AdamPower, long regime (wsd)",
        "pairs": _pairs(regime_base(plan, True), plan.seeds),
    }


def long_specs(plan: Plan) -> list[RunSpec]:
    return [r for pair in long_comparison(plan)["pairs"] for r in pair]


def short_specs(plan: Plan) -> list[RunSpec]:
    """Runs of comparisons 1-5 and 7 (the short regime)."""
    specs = [r for c in comparisons(plan) for pair in c["pairs"] for r in pair]
    return specs + batch_specs(plan)


# ------------------------------------------------------------------------------------------- which p
def p_grid(plan: Plan, optim: str) -> tuple[float, ...]:
    """The p values swept for ``optim`` ("adampower" / "muonpower"), 1.0 (its baseline) included."""
    return tuple(sorted({1.0, *(SMOKE_P_GRID if plan.smoke else P_GRID[optim])}))


def sweep_seeds(plan: Plan) -> range:
    """Seeds the p is selected on."""
    return range(plan.seeds)


def fresh_seeds(plan: Plan) -> range:
    """Seeds the selected p is validated on: no part in the choice."""
    return range(plan.seeds, 2 * plan.seeds)


def p_run(plan: Plan, optim: str, p: float, long: bool, seed: int) -> RunSpec:
    """One run of the which-p study; p = 1 is the baseline optimizer (AdamW / Muon) itself."""
    base = replace(regime_base(plan, long), seed=seed)
    return replace(base, optim=BASELINE[optim]) if p == 1.0 else replace(base, optim=optim, p=p)


def p_runs(plan: Plan, optim: str, long: bool, ps, seeds) -> dict[float, list[RunSpec]]:
    return {p: [p_run(plan, optim, p, long, s) for s in seeds] for p in ps}


def select_p(plan: Plan, optim: str, long: bool, results: dict[str, dict]) -> float | None:
    """The sweep's choice: argmin over the grid (1.0 included) of the mean final eval loss over the sweep
    seeds; None until every run of the sweep is in ``results``."""
    means = {}
    for p, runs in p_runs(plan, optim, long, p_grid(plan, optim), sweep_seeds(plan)).items():
        if not all(r.key in results for r in runs):
            return None
        means[p] = sum(results[r.key]["final_eval_loss"] for r in runs) / len(runs)
    return min(means, key=means.get)


def validation_ps(selected: float | None) -> tuple[float, ...]:
    """The p values run on the fresh seeds: the baseline, p = 1.2 and the sweep's choice (once known)."""
    return tuple(dict.fromkeys((1.0, P_MAIN) + (() if selected is None else (selected,))))


def which_p_specs(plan: Plan, long: bool, results: dict[str, dict]) -> list[RunSpec]:
    """Sweep and validation runs of one regime; the validation of the sweep's choice appears once the sweep
    (in ``results``) is complete."""
    out = []
    for optim in P_GRID:
        out += [
            r
            for runs in p_runs(plan, optim, long, p_grid(plan, optim), sweep_seeds(plan)).values()
            for r in runs
        ]
        selected = select_p(plan, optim, long, results)
        out += [
            r
            for runs in p_runs(plan, optim, long, validation_ps(selected), fresh_seeds(plan)).values()
            for r in runs
        ]
    return out


def all_specs(plan: Plan, results: dict[str, dict]) -> list[RunSpec]:
    """Every run of the suite, the short regime first; identical runs are shared (e.g. AdamW wsd seed 0 is in
    2, 6 and 9-17). ``results``: the finished runs, which decide the validation of the sweep's choice."""
    specs = short_specs(plan) + noise_specs(plan, long=False) + which_p_specs(plan, False, results)
    specs += long_specs(plan) + noise_specs(plan, long=True) + which_p_specs(plan, True, results)
    return list(dict.fromkeys(specs))


def estimate_seconds(specs: list[RunSpec], plan: Plan, speed: Speed) -> float:
    """Predicted wall time: fixed cost per run + training steps + evaluations.

    An evaluated block costs about a third of a training sequence (forward only, no backward or update),
    i.e. ``step_time / (3 x BASE_BATCH)``; that matches the ~0.3 s measured for 64 blocks here.
    """
    eval_as_steps = (1 if plan.smoke else EVALS) * plan.max_eval_blocks / (3 * BASE_BATCH)
    return sum(
        speed.overhead + (r.cost() + eval_as_steps * MODEL_COST[r.model]) * speed.step_time for r in specs
    )
