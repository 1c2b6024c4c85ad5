"""Optimizer-step cost of GradPower: fused AdamW vs AdamPower and the hook path, per phi implementation.

    python -m benchmarks.optimizer_step [--device cpu|cuda] [--threads 1,2] [--steps 20] [--compile]
                                        [--variants native,avx2,portable,eager] [--no-muon] [--out DIR]

Times ``optimizer.step()`` alone (gradients are refreshed from a saved copy outside the timed region,
so phi never sees its own output) on a ~34M-parameter LLaMA. On CPU every phi implementation this
machine can build runs in turn -- the C kernel variants ``native`` (AVX-512 here), ``avx2``, ``portable``
and the eager torch ops -- interleaved step by step with fused AdamW, so machine noise hits all rows
alike, once per thread count. Rows: ``adampower`` is the registry's AdamPower (one pass over memory where
the C kernel runs), ``adamw+attach`` is ``attach(AdamW(fused=True))``, the hook path any optimizer gets
(phi as its own pass, one kernel call for all gradients). ``--compile`` adds ``adampower[inductor]``:
phi + AdamW as one ``torch.compile``d function per tensor (Inductor's CPU codegen), the maintained
alternative the C kernel has to beat. Reports medians, the spread (25th-75th percentile), ratios to fused
AdamW and optimizer-state bytes; writes a Markdown + JSON report naming the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_gradpower as gp
from hf_gradpower.kernels import cpu

VARIANTS = ("native", "avx2", "portable")


def bench_model(device: str, small: bool = False) -> torch.nn.Module:
    """The ~34M-parameter benchmark LLaMA (``small``: a ~0.1M one for smoke runs)."""
    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False,
    ) if not small else LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    """CPU model and the ISA extensions that matter here."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx2", "fma", "asimd", "sve") if f in flags]
    return f"{model} ({', '.join(isa) or 'ISA unknown'})"


class CompiledAdamPower:
    """phi + AdamW per tensor as one ``torch.compile``d function (Inductor CPU codegen); 0-d tensor scalars."""

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8,
                 p: float = gp.DEFAULT_POWER):
        self.params = [q for q in params if q.requires_grad]
        self.state = {q: (torch.zeros_like(q), torch.zeros_like(q)) for q in self.params}
        self.lr, self.wd, self.betas, self.eps, self.p, self.t = lr, weight_decay, betas, eps, p, 0
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fn = torch.compile(_phi_adamw_, dynamic=False)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        scalars = [torch.tensor(v, dtype=torch.float32) for v in (
            self.p, 1 - self.lr * self.wd, b1, b2, self.lr / (1 - b1**self.t), (1 - b2**self.t) ** -0.5, self.eps)]
        for q in self.params:
            self.fn(q, q.grad, *self.state[q], *scalars)


def _phi_adamw_(param, grad, m, v, p, decay, b1, b2, step_size, ibc2, eps):
    g = grad.abs().pow(p).copysign(grad)
    m.mul_(b1).add_(g * (1 - b1))
    v.mul_(b2).add_(g * g * (1 - b2))
    param.mul_(decay).sub_(step_size * m / (v.sqrt() * ibc2 + eps))


def build(model: torch.nn.Module, name: str):
    hyper = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    if name == "adamw+attach":
        return gp.attach(build(model, "adamw"), gp.DEFAULT_POWER)
    if name == "adampower[inductor]":
        return CompiledAdamPower(model.parameters(), **hyper)
    return gp.build_optimizer(model, name, **hyper)


def phi_kernels(device: str, variants: tuple[str, ...]) -> dict[str, cpu.CpuKernel | None]:
    """Label -> kernel (None: eager torch ops) for every variant this machine builds and validates."""
    if device != "cpu":
        return {"eager-torch": None}
    out: dict[str, cpu.CpuKernel | None] = {}
    for v in (v for v in variants if v != "eager"):
        try:
            k = cpu.load_variant(v)
        except RuntimeError as exc:
            print(f"variant {v}: not available ({exc})")
            continue
        out.setdefault(k.impl, k)  # on an AVX2-only machine native and avx2 are the same code
    if "eager" in variants:
        out["eager-torch"] = None
    return out


def time_steps(device: str, steps: int, warmup: int, rows: list[tuple[str, str | None]], kernels: dict,
               build_fn=None, step_fn=None, small: bool = False) -> dict:
    """Median and quartiles (ms) of each (optimizer, kernel) row, all rows interleaved step by step.

    ``build_fn(model, name)`` builds a row's optimizer (default :func:`build`); ``step_fn(name, optimizer, model)``
    is the timed work (default ``optimizer.step()``)."""
    names = list(dict.fromkeys(n for n, _ in rows))
    models = {n: bench_model(device, small) for n in names}
    optimizers = {n: (build_fn or build)(models[n], n) for n in names}
    gen = torch.Generator(device="cpu").manual_seed(1)
    saved = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in models[names[0]].parameters()]
    times: dict[str, list[float]] = {}
    for i in range(warmup + steps):
        for n, label in rows:
            for p, g in zip(models[n].parameters(), saved, strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            with cpu.using_kernel(kernels[label]) if label in kernels else contextlib.nullcontext():
                sync(device)
                t0 = time.perf_counter()
                if step_fn is None:
                    optimizers[n].step()
                else:
                    step_fn(n, optimizers[n], models[n])
                sync(device)
            if i >= warmup:
                times.setdefault(f"{n}[{label}]" if label else n, []).append(time.perf_counter() - t0)
    result = {}
    for key, ts in times.items():
        q = statistics.quantiles([t * 1e3 for t in ts], n=4)
        result[key] = {"median": statistics.median(ts) * 1e3, "q1": q[0], "q3": q[2]}
    return {
        "rows": result,
        "state_bytes": {n: state_bytes(o) for n, o in optimizers.items() if isinstance(o, torch.optim.Optimizer)},
        "parameters": sum(p.numel() for p in models[names[0]].parameters()),
    }


def run(device: str, threads: list[int], steps: int, warmup: int, compile_: bool, muon: bool,
        variants: tuple[str, ...] = (*VARIANTS, "eager")) -> dict:
    kernels = phi_kernels(device, variants)
    rows: list[tuple[str, str | None]] = [("adamw", None)]
    rows += [("adampower", k) for k in kernels] + [("adamw+attach", k) for k in kernels]
    if compile_ and device == "cpu":
        rows.append(("adampower[inductor]", None))
    results = {}
    for t in threads:
        torch.set_num_threads(t)
        results[str(t)] = time_steps(device, steps, warmup, rows, kernels)
        print(markdown_block(t, results[str(t)]))
    if muon:
        with cpu.using_kernel(next((k for k in kernels.values() if k is not None), None)):
            results["muon"] = time_steps(device, steps, warmup, [("muon", None), ("muonpower", None)], {})
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu_name(),
        "steps": steps,
        "torch": torch.__version__,
        "kernels": {label: (k.flags if k else "torch ops") for label, k in kernels.items()},
        "threads": results,
    }


def markdown_block(threads, block: dict) -> str:
    rows = block["rows"]
    base = rows["adamw"]["median"]
    lines = [
        f"**{threads} thread{'s' if str(threads) != '1' else ''}**" if threads != "muon" else "**Muon**",
        "",
        "| optimizer [phi implementation] | step (ms) | 25-75% (ms) | vs fused AdamW |",
        "|---|---:|---:|---:|",
    ]
    if threads == "muon":
        base = rows["muon"]["median"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['median']:.1f} | {r['q1']:.1f}-{r['q3']:.1f} | {r['median'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    first = next(iter(result["threads"].values()))
    head = [
        f"### Optimizer step on {result['device']}: {result['cpu']}",
        "",
        f"{first['parameters'] / 1e6:.1f}M parameters, median of {result['steps']} interleaved steps, "
        f"torch {result['torch']}. Optimizer state (MB): "
        + ", ".join(f"{n} {b / 2**20:.1f}" for n, b in first["state_bytes"].items()),
    ]
    return markdown_report(head, result, markdown_block)


def markdown_report(head: list[str], result: dict, block) -> str:
    """``head``, the phi implementations that ran, then ``block(threads, results)`` per thread count."""
    lines = [*head, "", "phi implementations: " + "; ".join(f"`{k}`: {' '.join(v) if isinstance(v, list) else v}"
                                                         for k, v in result["kernels"].items()), ""]  # fmt: skip
    lines += [block(threads, results) for threads, results in result["threads"].items()]
    return "\n".join(lines)


def step_parser(description: str) -> argparse.ArgumentParser:
    """The options every optimizer-step benchmark takes (device, threads, steps, phi implementations, output)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts (default 1,2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join((*VARIANTS, "eager")),
                        help="CPU phi implementations to time (default: all of native,avx2,portable,eager)")
    parser.add_argument("--no-muon", action="store_true", help="skip Muon vs MuonPower (slow on CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser


def parse_step_args(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[int], tuple[str, ...]]:
    """Parsed options, thread counts and phi implementations; one clear error for each bad value."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if args.steps < 2 or args.warmup < 0 or any(t < 1 for t in threads):
        parser.error("--steps must be >= 2, --warmup >= 0 and every thread count >= 1")
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - {*VARIANTS, "eager"}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join((*VARIANTS, 'eager'))}")
    return args, threads, variants


def write_report(out: Path, stem: str, report: str, result: dict) -> None:
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(report)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / stem}.md and .json")


def main(argv=None) -> None:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="add the torch.compile (Inductor) row on CPU")
    args, threads, variants = parse_step_args(parser, argv)
    result = run(args.device, threads, args.steps, args.warmup, args.compile, not args.no_muon, variants)
    write_report(args.out, f"optimizer_step_{args.device}", markdown(result), result)

if __name__ == "__main__":
    main()
