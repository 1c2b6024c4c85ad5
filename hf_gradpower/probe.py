"""Should this run use GradPower, and with which p? Measure before committing GPU hours.

    python -m hf_gradpower.probe [--probe_steps 30] [--probe_json probe.json] <run_pretrain.py arguments>

Trains ``--probe_steps`` steps of exactly the configuration ``run_pretrain.py`` would train (same model,
data, optimizer, global batch), measures the gradient noise scale ``B_simple`` (``hf_gradpower.noise``)
and prints it with the p Example 4.1 reads from it (``hf_gradpower.p_theory.auto_power``). The
recommended p does not come from that early noise (p = 1.2 loses early and wins later in the same run):
it comes from the measured evidence nearest to the run's regime (:func:`recommend`: optimizer, planned
tokens per parameter, batch in tokens), our CPU runs (``resources/evidence/p_evidence.json``, written by
``python -m benchmarks.reproduce``) and the paper's, and says when the run lies outside all of them.
The same goes to a JSON file.

Measuring needs at least two micro-batches per step: a single-process run without gradient accumulation
is probed with the per-device batch halved (same global batch, so the same gradient). Early steps are
the least noisy part of training (the noise scale grows as the loss falls), so a short probe leans low.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from hf_gradpower.p_theory import AUTO_RANGE, EPS, auto_power
from hf_gradpower.trainer import GradPowerNoiseCallback

DEFAULT_PROBE_STEPS = 30
EVIDENCE_FILE = Path(__file__).parent / "resources" / "evidence" / "p_evidence.json"  # in the wheel
NEAR = 3.0  # a regime within this factor of measured evidence in tokens per parameter and in batch is covered


@dataclass(frozen=True)
class Evidence:
    """A measured regime and the p it supports."""

    source: str  # "ours" (the CPU reproduction) or "paper" (arXiv 2505.24275)
    optimizer: str  # the GradPower optimizer: "adampower" (AdamW family) or "muonpower"
    regime: str
    setting: str  # the runs, in words
    tokens_per_param: float  # tokens trained per model parameter
    batch_tokens: int  # global batch x sequence length
    p: float  # the p this evidence supports (1.0: the baseline optimizer, no GradPower)
    validated: bool  # held on runs that played no part in choosing it
    basis: str  # the numbers behind ``p``, in words


PAPER = tuple(
    Evidence(
        "paper",
        optim,
        "paper",
        "the paper's C4 runs: LLaMA 66M-2B at batch 512 x 256 tokens on GPUs",
        20.0,
        512 * 256,
        1.2,
        True,
        basis,
    )
    for optim, basis in (
        (
            "adampower",
            "p = 1.2, chosen on LLaMA-0.2B and fixed for every other model, schedule and dataset, "
            "lowered the terminal loss against AdamW in all of them (arXiv 2505.24275, Section 3)",
        ),
        (
            "muonpower",
            "MuonPower p = 1.2 lowered the terminal loss against Muon (LLaMA-0.2B, C4, wsd; "
            "arXiv 2505.24275, Section 3.4)",
        ),
    )
)


def load_evidence(path: Path = EVIDENCE_FILE) -> list[Evidence]:
    """Our measured regimes (the shipped table) and the paper's."""
    ours = [Evidence(**e) for e in json.loads(path.read_text())] if path.exists() else []
    return [*ours, *PAPER]


def gradpower_optimizer(optim: str) -> str | None:
    """The GradPower optimizer whose evidence speaks for ``--optim`` (AdamW family or Muon), else None."""
    name = optim.lower()
    return "adampower" if name.startswith("adam") else ("muonpower" if name.startswith("muon") else None)


@dataclass(frozen=True)
class Recommendation:
    optim: str
    tokens_per_param: float
    batch_tokens: int
    p: float | None  # None: no evidence for this optimizer
    evidence: Evidence | None  # the nearest measured regime
    covered: bool  # within a factor NEAR of it in tokens per parameter and in batch

    @property
    def flags(self) -> str:
        """The command-line flags for ``p``."""
        if self.p is None:
            return ""
        if self.p == 1.0:
            return "--optim " + ("muon" if gradpower_optimizer(self.optim) == "muonpower" else "adamw")
        return f"--optim {gradpower_optimizer(self.optim)} --gradpower_p {self.p:g}"

    @property
    def headline(self) -> str:
        """One line: the p and the evidence it rests on (the README quotes it for the quick-start run)."""
        run = f"{self.tokens_per_param:.2g} tokens per parameter, batch {self.batch_tokens:,} tokens"
        if self.evidence is None:
            return (
                f"no recommended p for --optim {self.optim} ({run}): GradPower was measured with AdamW and "
                "Muon only"
            )
        e = self.evidence
        plain = " (the baseline optimizer, no GradPower)" if self.p == 1.0 else ""
        out = (
            f"recommended p = {self.p:g}{plain} for this run ({run}). Nearest evidence "
            f"({e.tokens_per_param:.2g} tokens per parameter): {e.setting}; {e.basis}."
        )
        if not self.covered:
            out += (
                f" This run lies outside everything measured (more than {NEAR:g}x from every measured regime in "
                "tokens per parameter or batch): treat p as a starting point and compare with the baseline."
            )
        return out


def recommend(
    optim: str, tokens_per_param: float, batch_tokens: int, evidence: list[Evidence] | None = None
) -> Recommendation:
    """The p of the measured regime nearest to this run: same GradPower optimizer, then the smallest
    |log ratio| of tokens per parameter plus |log ratio| of batch tokens."""
    family = gradpower_optimizer(optim)
    pool = [e for e in (load_evidence() if evidence is None else evidence) if e.optimizer == family]
    if not pool:
        return Recommendation(optim, tokens_per_param, batch_tokens, None, None, False)

    def gaps(e: Evidence) -> tuple[float, float]:
        return (
            abs(math.log(tokens_per_param / e.tokens_per_param)),
            abs(math.log(batch_tokens / e.batch_tokens)),
        )

    nearest = min(pool, key=lambda e: sum(gaps(e)))
    covered = max(gaps(nearest)) <= math.log(NEAR)
    return Recommendation(optim, tokens_per_param, batch_tokens, nearest.p, nearest, covered)


def recommendation_for(train_argv: list[str]) -> Recommendation:
    """:func:`recommend` for a ``run_pretrain`` configuration (read only: nothing is trained)."""
    from hf_gradpower import pretrain

    _, _, args, facts = pretrain.parse_args(list(train_argv))
    return _for_run(args, facts)


def _for_run(args, facts: dict) -> Recommendation:
    batch_tokens = facts["global_batch"] * facts["seq_len"]
    return recommend(str(args.optim), args.max_steps * batch_tokens / facts["parameters"], batch_tokens)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument(
        "--probe_steps", type=int, default=DEFAULT_PROBE_STEPS, help="steps to train and measure"
    )
    parser.add_argument(
        "--probe_json", type=Path, default=Path("probe.json"), help="where to write the result"
    )
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.probe_steps < 2:
        parser.error(f"--probe_steps must be >= 2 (got {own.probe_steps}): the noise needs a few steps")
    result = probe(rest, own.probe_steps)
    own.probe_json.parent.mkdir(parents=True, exist_ok=True)
    own.probe_json.write_text(json.dumps(result, indent=1))
    print(result["sentence"], flush=True)
    print(f"[probe] {result['recommendation']['headline']}", flush=True)
    print(f"[probe] details: {own.probe_json}", flush=True)
    return result


def probe(train_argv: list[str], steps: int) -> dict:
    """Train ``steps`` steps of the ``run_pretrain`` configuration ``train_argv``; the measured noise and advice."""
    from hf_gradpower import pretrain

    train_argv = list(train_argv)
    _, _, args, facts = pretrain.parse_args(list(train_argv))  # checks the config before any training
    advice = _for_run(args, facts)
    split = []
    if args.gradient_accumulation_steps * args.world_size == 1:
        batch = args.per_device_train_batch_size
        if batch < 2:
            raise ValueError(
                "the noise needs >= 2 micro-batches per step, and a batch of 1 sequence cannot be "
                "split: probe with --global_batch_size >= 2"
            )
        micro = max(d for d in range(1, batch) if batch % d == 0)  # the same global batch, accumulated
        split = ["--per_device_train_batch_size", str(micro)]
    callback = GradPowerNoiseCallback(spec=None, measure_noise=True)
    tmp = Path(tempfile.mkdtemp(prefix="gp_probe_"))
    overrides = [
        "--max_steps",
        str(steps),
        "--warmup_steps",
        str(max(1, steps // 10)),
        "--gradpower_noise",
        "true",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--logging_steps",
        str(max(1, steps // 10)),
        "--report_to",
        "none",
        "--push_to_hub",
        "false",
        "--max_eval_blocks",
        "1",
        "--output_dir",
        str(tmp / "run"),
        *split,
    ]
    try:
        pretrain.run(train_argv + overrides, callbacks=[callback])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return measured(callback, facts, str(args.optim), steps) | {
        "recommended_p": advice.p,
        "recommendation": {**asdict(advice), "headline": advice.headline, "flags": advice.flags},
    }


def measured(callback: GradPowerNoiseCallback, facts: dict, optim: str, steps: int) -> dict:
    """The probe's measurement: overall and per-group noise, Example 4.1's p for it, the noise sentence."""
    meter = callback.meter
    if meter is None or meter.steps == 0:
        raise RuntimeError("no gradient noise was measured (no step had >= 2 micro-batches)")
    total = meter.stats()
    batch = total["batch_size"]
    eps = EPS  # AdamW's default, and the recipes'
    groups = []
    for i in range(len(meter.groups)):
        s = meter.stats(i)
        groups.append(
            {
                "group": i,
                "numel": s["numel"],
                "b_simple": s["b_simple"],
                "noise_p": auto_power(s["grad_sq"], s["trace_cov"], s["numel"], batch, eps),
            }
        )
    p = auto_power(total["grad_sq"], total["trace_cov"], total["numel"], batch, eps)
    ratio = total["b_simple"] / batch
    if p > 1:
        regime, why = (
            "noise-dominated",
            "Example 4.1's best p is above 1 (GradPower amplifies the consistent part)",
        )
    else:
        regime, why = (
            "signal-dominated",
            "Example 4.1's best p is at or below 1 (p > 1 would shrink the update)",
        )
    sentence = (
        f"[probe] measured B_simple = {total['b_simple']:.3g} sequences vs your batch of {batch} "
        f"(noise/batch {ratio:.2f}) after {steps} steps: {regime}, {why}; Example 4.1 reads p = {p:g} from "
        f"this noise (what `auto` would pick now, clamped to {AUTO_RANGE[0]}-{AUTO_RANGE[1]}). The noise grows "
        "as training goes on, so the recommended p below comes from measured runs, not from it."
    )
    return {
        "model_config": facts.get("model_config"),
        "optim": optim,
        "steps": steps,
        "batch_size": batch,
        "micro_batch_size": meter.micro_batch_size,
        "b_simple": total["b_simple"],
        "grad_sq": total["grad_sq"],
        "trace_cov": total["trace_cov"],
        "noise_to_batch": ratio,
        "regime": regime,
        "noise_p": p,
        "p_range": list(AUTO_RANGE),
        "groups": groups,
        "sentence": sentence,
    }


def cli() -> int:
    """The ``hf-gradpower-probe`` command: ``main`` with an exit status."""
    main()
    return 0


if __name__ == "__main__":
    main()
