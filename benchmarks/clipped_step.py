"""The step users actually run: gradient clipping + optimizer step, the baseline against GradPower's default path.

    python -m benchmarks.clipped_step [--device cpu|cuda] [--threads 1,2] [--steps 20] [--warmup 3]
                                      [--variants native,avx2,portable,eager] [--no-muon] [--smoke] [--out DIR]

Each timed step is ``clip to max_norm 1.0`` (active on the benchmark gradients) + ``optimizer.step()`` on the
~34M-parameter LLaMA of :mod:`benchmarks.optimizer_step` (``--smoke``: a tiny one), gradients refreshed from a
saved copy outside the timed region, every row interleaved step by step, once per thread count. Rows:

* ``adamw``: ``torch.nn.utils.clip_grad_norm_`` + fused AdamW, i.e. Trainer's AdamW with clipping (the baseline);
* ``adampower[impl]``: GradPowerTrainer's default (``before_clip``): :func:`hf_gradpower.clip_and_power_` + AdamPower's
  step. On a CPU the norm pass writes phi(g) and the step is AdamW on ``coef * phi(g)`` in one pass; on an
  accelerator the norm pass only reads and phi and the coefficient run inside AdamPower's one-pass step;
* ``adampower-read_only[impl]`` (CPU only): the accelerator route on CPU tensors, to show the choice;
* ``adampower-apply_now[impl]``: phi written into the gradients first (``apply_now``), then ``clip_grad_norm_``,
  then the step (the route of `apply_now`, three passes over the gradients before the step);
* ``sgd`` / ``sgdpower[impl]`` / ``sgdpower-read_only[impl]``: SGD (momentum 0.9) with ``clip_grad_norm_``
  against ``attach(SGD)`` with ``clip_and_power_`` (CPU: phi written by the norm pass, the coefficient multiplied
  in at the step; read only: phi and the coefficient in one pass at the step), then SGD;
* ``muon`` / ``muonpower``: MuonAdamW with ``clip_grad_norm_`` against MuonPower with ``clip_and_power_``
  (the fastest phi implementation), at each thread count.

``impl`` is each CPU phi implementation this machine builds (C kernel variants, eager torch ops), as in
:mod:`benchmarks.optimizer_step`. Writes ``clipped_step_<device>.md`` / ``.json`` naming the CPU and its ISA.
GPU: :func:`clipped_step` is the timed work of a row (``gpu_check`` can call it in place of ``optimizer.step()``);
bytes per fp32 parameter: ``adamw`` 40 (norm 4, scaling 8, AdamW 28), ``adampower`` 32 on an accelerator (norm 4,
one pass 28), 36 on a CPU (norm pass writing phi 8, AdamW 28).
"""

from __future__ import annotations

import contextlib

import torch

import hf_gradpower as gp
from benchmarks.optimizer_step import (
    cpu_name,
    markdown_report,
    parse_step_args,
    phi_kernels,
    step_parser,
    time_steps,
    write_report,
)
from hf_gradpower.kernels import cpu, dispatch, eager

MAX_NORM = 1.0
APPLY_NOW = "-apply_now"
READ_ONLY = "-read_only"
BASES = {"adampower": "adamw", "adampower" + APPLY_NOW: "adamw", "adampower" + READ_ONLY: "adamw",
         "sgdpower": "sgd", "sgdpower" + READ_ONLY: "sgd", "muonpower": "muon"}  # fmt: skip
MUON_BLOCK = " muon"  # key suffix of a thread count's Muon rows
STEP_BYTES = {"adamw": 40, "adampower": 32}  # per fp32 parameter, see the module docstring


def build(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """The optimizer of a row (its name without the route suffix), built as the registry builds it."""
    name = name.removesuffix(APPLY_NOW).removesuffix(READ_ONLY)
    if name.startswith("sgd"):
        return gp.build_optimizer(model, name, lr=1e-4, weight_decay=0.1, momentum=0.9)
    return gp.build_optimizer(model, name, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))


def clipped_step(name: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """One row's timed work: its clipping route, then ``optimizer.step()``."""
    if name.endswith(APPLY_NOW):
        gp.apply_now(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    elif name.endswith(READ_ONLY):
        with norm_pass_read_only():
            gp.clip_and_power_(optimizer, MAX_NORM)
    elif name.endswith("power"):
        gp.clip_and_power_(optimizer, MAX_NORM)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()


@contextlib.contextmanager
def norm_pass_read_only():
    """The accelerator route on CPU tensors, for comparison: the norm pass only reads, the step computes phi again."""
    saved = cpu.WRITES_PHI_IN_NORM_PASS, eager.WRITES_PHI_IN_NORM_PASS
    cpu.WRITES_PHI_IN_NORM_PASS = eager.WRITES_PHI_IN_NORM_PASS = False
    try:
        yield
    finally:
        cpu.WRITES_PHI_IN_NORM_PASS, eager.WRITES_PHI_IN_NORM_PASS = saved


def run(
    device: str,
    threads: list[int],
    steps: int,
    warmup: int,
    muon: bool,
    variants: tuple[str, ...],
    small: bool = False,
) -> dict:
    if device == "cpu":
        kernels = phi_kernels(device, variants)
    else:  # one implementation per device: the backend the dispatcher picks (Triton where it passes its check)
        kernels = {dispatch.backend_name(torch.zeros(4, device=device)): None}
    rows: list[tuple[str, str | None]] = [("adamw", None), ("sgd", None)]
    for name in ("adampower", "adampower" + READ_ONLY, "adampower" + APPLY_NOW, "sgdpower", "sgdpower" + READ_ONLY):
        if device == "cpu" or not name.endswith(READ_ONLY):  # on accelerators the default route is the read-only one
            rows += [(name, k) for k in kernels if not (name.endswith(READ_ONLY) and k == "eager-torch")]
    timed = dict(build_fn=build, step_fn=clipped_step, small=small)
    results = {}
    fastest = next((k for k in kernels.values() if k is not None), None)
    for t in threads:
        torch.set_num_threads(t)
        results[str(t)] = time_steps(device, steps, warmup, rows, kernels, **timed)
        print(markdown_block(str(t), results[str(t)]))
        if muon:
            with cpu.using_kernel(fastest) if device == "cpu" else contextlib.nullcontext():
                results[f"{t}{MUON_BLOCK}"] = time_steps(
                    device, steps, warmup, [("muon", None), ("muonpower", None)], {}, **timed
                )
            print(markdown_block(f"{t}{MUON_BLOCK}", results[f"{t}{MUON_BLOCK}"]))
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu_name(),
        "steps": steps,
        "max_norm": MAX_NORM,
        "torch": torch.__version__,
        "kernels": {label: k.flags if k else "torch ops" if label == "eager-torch" else "the dispatcher's choice"
                    for label, k in kernels.items()},  # fmt: skip
        "threads": results,
    }


def ratios(block: dict) -> dict[str, float]:
    """Each GradPower row's median over its baseline's (same thread count)."""
    rows = block["rows"]
    out = {}
    for key, r in rows.items():
        base = BASES.get(key.split("[")[0])
        if base is not None and base in rows:
            out[key] = r["median"] / rows[base]["median"]
    return out


def markdown_block(threads: str, block: dict) -> str:
    count = threads.removesuffix(MUON_BLOCK)
    title = f"**{'Muon, ' if threads.endswith(MUON_BLOCK) else ''}{count} thread{'s' if count != '1' else ''}**"
    lines = [title, "", "| clipping + step [phi implementation] | ms | 25-75% (ms) | vs its baseline |",
             "|---|---:|---:|---:|"]  # fmt: skip
    ratio = ratios(block)
    for key, r in block["rows"].items():
        vs = f"{ratio[key]:.2f}x" if key in ratio else "baseline"
        lines.append(f"| {key} | {r['median']:.1f} | {r['q1']:.1f}-{r['q3']:.1f} | {vs} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    first = next(iter(result["threads"].values()))
    head = [
        f"### Clipping + optimizer step on {result['device']}: {result['cpu']}",
        "",
        f"{first['parameters'] / 1e6:.1f}M parameters, clipping to max_norm {result['max_norm']} (active), median of "
        f"{result['steps']} interleaved steps, torch {result['torch']}. Baselines: `adamw` = clip_grad_norm_ + fused "
        "AdamW (Trainer's AdamW with clipping), `sgd` = clip_grad_norm_ + SGD, `muon` = clip_grad_norm_ + Muon. "
        "`adampower` = GradPowerTrainer's default path, clip_and_power_ + the step (on a CPU the norm pass writes "
        "phi and the step is AdamW on coef * phi; on an accelerator the norm pass only reads and the one-pass step "
        "applies phi and coef); `-read_only` = the accelerator route on CPU tensors; `-apply_now` = phi written "
        "first, then clip_grad_norm_, then the step.",
    ]
    return markdown_report(head, result, markdown_block)


def main(argv=None) -> dict:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks that the benchmark runs")
    args, threads, variants = parse_step_args(parser, argv)
    result = run(args.device, threads, args.steps, args.warmup, not args.no_muon, variants, small=args.smoke)
    stem = f"clipped_step_{args.device}" + ("_smoke" if args.smoke else "")
    write_report(args.out, stem, markdown(result), result)
    return result


if __name__ == "__main__":
    main()
