"""Optimizer-step cost of GradPower: fused AdamW vs AdamPower, Muon vs MuonPower, side by side.

    python -m benchmarks.optimizer_step [--device cpu|cuda] [--steps 20] [--out benchmarks/results]

Times ``optimizer.step()`` alone (gradients are refreshed from a saved copy outside the timed region,
so phi never sees its own output) on a ~34M-parameter LLaMA, interleaving the optimizers step by step
so that machine noise hits all of them alike. Rows: ``adampower`` is the registry's AdamPower (one pass
over memory on CPU), ``adamw+attach`` is ``attach(AdamW(fused=True))``, the hook path any optimizer
gets (phi as its own pass). Reports medians, ratios and optimizer-state bytes (GradPower must add no
persistent memory), and writes a Markdown + JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_gradpower as gp
from hf_gradpower import _kernels

PAIRS = [("adamw", "adampower"), ("adamw", "adamw+attach"), ("muon", "muonpower")]


def bench_model(device: str) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def phi_kernel(device: str) -> str:
    """Which implementation of phi ran: the C kernel on CPU fp32, else torch's eager ops."""
    info = _kernels.kernel_info()
    fast = device == "cpu" and info.get("available") and info.get("mode") != "eager"
    return info.get("impl", "c") if fast else "eager-torch"


def build(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adamw+attach":
        return gp.attach(build(model, "adamw"), gp.DEFAULT_POWER)
    return gp.build_optimizer(model, name, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))


def run(device: str, steps: int, warmup: int) -> dict:
    names = list(dict.fromkeys(n for pair in PAIRS for n in pair))
    models = {n: bench_model(device) for n in names}
    optimizers = {n: build(models[n], n) for n in names}
    gen = torch.Generator(device="cpu").manual_seed(1)
    saved = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in models[names[0]].parameters()]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        for n in names:
            for p, g in zip(models[n].parameters(), saved, strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            sync(device)
            t0 = time.perf_counter()
            optimizers[n].step()
            sync(device)
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in models[names[0]].parameters())
    medians = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "steps": steps,
        "kernel": phi_kernel(device),
        "median_ms": medians,
        "ratio": {power: medians[power] / medians[base] for base, power in PAIRS},
        "state_bytes": {n: state_bytes(o) for n, o in optimizers.items()},
        "fused_adamw": bool(optimizers["adamw"].param_groups[0]["fused"]),
        "torch": torch.__version__,
    }


def markdown(result: dict) -> str:
    lines = [
        f"### Optimizer step on {result['device']} ({result['threads']} threads), "
        f"{result['parameters'] / 1e6:.1f}M parameters, median of {result['steps']} steps",
        "",
        f"torch {result['torch']}, phi kernel: `{result['kernel']}`, AdamW fused: {result['fused_adamw']}",
        "",
        "| optimizer | step (ms) | vs base | optimizer state (MB) |",
        "|---|---:|---:|---:|",
    ]
    for n in result["median_ms"]:
        ratio = f"{result['ratio'][n]:.2f}x" if n in result["ratio"] else ""
        lines.append(f"| {n} | {result['median_ms'][n]:.1f} | {ratio} | {result['state_bytes'][n] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    result = run(args.device, args.steps, args.warmup)
    report = markdown(result)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"optimizer_step_{args.device}"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
