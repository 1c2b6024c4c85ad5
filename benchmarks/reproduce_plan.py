"""The reproduction suite's plan: which runs (``RunSpec``), how long (``Plan``), paired into comparisons.

Part of ``python -m benchmarks.reproduce`` (see that module for the suite); run keys name the result files
in ``<out>/runs``, so changing a key's format orphans stored runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

LR = 1e-3
P_MAIN = 1.2
P_SWEEP = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5)
P_BATCH = (0.8, 1.0, 1.2, 1.5)
BATCHES = (4, 8, 32)
BASE_BATCH = 8
SEQ_LEN = 128
LONG_STEPS = 2000  # comparison 8: long enough for the ordering seen in the quick check to show
SMOKE_LONG_STEPS = 12  # differs from the smoke steps (8), so the smoke suite trains comparison 8's own runs
EVALS = 10  # evaluations along each full-mode run (smoke: only the final one)
P_RAMP = "linear:0.9:1.2"  # comparisons 9/12: p from the short-regime sweep's best up to the paper's default
# comparisons 14-17: ramps over a fixed 400 steps, then p = 1.2: in the long runs p = 1.2 loses to AdamW until
# ~300 steps and leads from 400 on (eval every 200 steps, all 3 seeds), so the ramps end where 1.2 starts to pay;
# from 0.9 (the short-regime sweep's best) and from 1.0 (AdamW)
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
         "variant": f"AdamPower p={P_RAMP}", "pairs": _pairs(base, plan.seeds, power={"p": None, "p_spec": P_RAMP})},
        {"name": f"{'13' if long else '10'}. LLaMA AdamW vs AdamPower p auto ({tag}, wsd)",
         "variant": "AdamPower p=auto", "pairs": _pairs(base, plan.seeds, power=AUTO)},
    ]
    for i, spec in enumerate(P_RAMPS_FIXED):
        comps.append({"name": f"{15 + 2 * i if long else 14 + 2 * i}. LLaMA AdamW vs AdamPower p={spec} ({tag}, wsd)",
                      "variant": f"AdamPower p={spec}",
                      "pairs": _pairs(base, plan.seeds, power={"p": None, "p_spec": spec})})
    if not long:
        comps.append({"name": "11. LLaMA Muon vs MuonPower p auto (short, wsd)", "variant": "MuonPower p=auto",
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
