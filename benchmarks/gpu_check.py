"""GPU evidence for GradPower in one command: correctness, optimizer-step cost, Trainer throughput and memory.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--size full|small] [--out benchmarks/results]

Writes ``gpu_check_<device>.md`` (and ``.json``). First the first-contact checks of
:mod:`hf_gradpower.gpu_check` (self-checks, Trainer steps of AdamPower / MuonPower / attach(AdamW)), then
three parts, each row says which implementation ran; on CUDA every timed optimizer step runs under
``torch.cuda.set_sync_debug_mode("error")``:

1. Correctness against float64: phi for fp32/bf16/fp16 gradients (and a loss-scaled one), one AdamPower
   step (fp32 and bf16 parameters), MuonPower's momentum, and fp16 autocast + ``torch.amp.GradScaler`` +
   ``attach(AdamW(fused=True))`` against the same run on phi(unscaled g).
2. The step a Trainer user runs, clipping (max norm 1.0) + optimizer step, on LLaMA-0.25B-sized parameters
   (``--size full``): GradPowerTrainer's default AdamPower route (:func:`hf_gradpower.clip_and_power_`, then
   the one-pass step) against ``clip_grad_norm_`` + fused AdamW, and MuonPower against Muon (targets on an
   H100: <= 1.00x, <= 1.02x), interleaved step by step, with bytes moved per parameter and the achieved
   bandwidth against a measured device copy and the spec-sheet peak.
3. End-to-end Trainer tokens/s, AdamPower / AdamW, through ``run_pretrain``'s code path on the embedded
   data (bf16 on a GPU; target >= 0.99), and the peak memory of each run.

``--size full`` takes a few minutes on one H100; ``--size small`` (default on CPU) is the same code on tiny
sizes, so the CPU path runs in the test suite. On CPU the GPU targets do not apply.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_gradpower as gp
from benchmarks.clipped_step import STEP_BYTES, clipped_step
from benchmarks.optimizer_step import build, state_bytes, sync
from benchmarks.throughput import OPTIMIZERS, StepTimer, summarize
from hf_gradpower import gpu_check
from hf_gradpower.kernels import dispatch, triton
from hf_gradpower.kernels.selfcheck import phi64, scaled_error, ulps
from hf_gradpower.model_configs import load_model_config
from hf_gradpower.pretrain import run

SIZES = {
    "full": dict(phi_numel=1 << 24, model_config="llama-0.25b-owt", steps=20, e2e_steps=50, e2e_warmup=10,
                 e2e_rounds=2, seq_len=1024, batch=16, quick_steps=20),
    "small": dict(phi_numel=1 << 12, model_config="llama-tiny", steps=1, e2e_steps=2, e2e_warmup=1,
                  e2e_rounds=1, seq_len=32, batch=2, quick_steps=2),
}  # fmt: skip
PHI_ULP_BOUND = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}
STATE_K = 8  # optimizer results: |x - ref| <= STATE_K * eps * max|ref|
TARGETS = {"adampower": 1.00, "muonpower": 1.02}
PAIRS = (("adamw", "adampower"), ("muon", "muonpower"))
PEAK_GBPS = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008}  # fmt: skip


def cpu_model() -> str:
    """CPU model name and vector ISA (from /proc/cpuinfo where available)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {isa}, {torch.get_num_threads()} threads"


def path_of(t: torch.Tensor) -> str:
    return dispatch.backend_name(t)


def gradients(n: int, device: str, seed: int = 0) -> torch.Tensor:
    """Normal samples with magnitudes spread over 1e-6..10 (gradients span many binades)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-6, 1, generator=gen)).to(device)


def check_phi(device: str, n: int, p: float) -> list[dict]:
    rows = []
    for dtype, bound in PHI_ULP_BOUND.items():
        g = gradients(n, device).to(dtype)
        ref = phi64(g, p)
        gp.power_([g], p)
        rows.append(dict(check=f"phi, {str(dtype)[6:]} gradients", path=path_of(g), error=ulps(g, ref), unit="ulp",
                         bound=bound))  # fmt: skip
    scale = 65536.0  # GradScaler's initial scale
    g = gradients(n, device)
    scaled = g * scale
    gp.power_([scaled], p, grad_scale=torch.tensor(scale, device=device))
    rows.append(dict(check="phi, loss-scaled fp32 (s = 65536)", path=path_of(g), error=ulps(scaled, phi64(g, p) * scale),
                     unit="ulp", bound=4.0))  # fmt: skip
    return rows


def adamw64(x, m, v, h, step, lr, wd, b1, b2, eps):
    """One AdamW step in float64 on the transformed gradient ``h``."""
    x, m, v = x.double(), m.double(), v.double()
    m = m + (1 - b1) * (h - m)
    v = b2 * v + (1 - b2) * h * h
    x = x * (1 - lr * wd) - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + eps)
    return x, m, v


def check_adampower(device: str, n: int, p: float) -> list[dict]:
    rows = []
    hyper = dict(lr=1e-2, wd=0.1, b1=0.9, b2=0.95, eps=1e-8)
    for dtype in (torch.float32, torch.bfloat16):
        param = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device, dtype))
        opt = gp.AdamPower([param], lr=hyper["lr"], p=p, weight_decay=hyper["wd"], betas=(hyper["b1"], hyper["b2"]),
                           eps=hyper["eps"])  # fmt: skip
        errors = []
        for step in (1, 2):
            param.grad = (gradients(n, device, seed=step) * 1e-2).to(dtype)
            state = opt.state.get(param, {})
            m0, v0 = (state.get(k, torch.zeros_like(param)).clone() for k in ("exp_avg", "exp_avg_sq"))
            refs = adamw64(param.detach().clone(), m0, v0, phi64(param.grad, p), step, **hyper)
            opt.step()
            errors += [scaled_error(t, r) for t, r in zip((param.detach(), opt.state[param]["exp_avg"],
                                                           opt.state[param]["exp_avg_sq"]), refs, strict=True)]  # fmt: skip
        rows.append(dict(check=f"AdamPower step, {str(dtype)[6:]} params (2 steps)", path=path_of(param.grad),
                         error=max(errors), unit="eps*max|ref|", bound=STATE_K))  # fmt: skip
    return rows


def check_muon_momentum(device: str, n: int, p: float) -> list[dict]:
    """MuonPower's momentum (fused on accelerators, phi + lerp elsewhere) against float64."""
    rows, mu = [], 0.95
    for dtype in (torch.float32, torch.bfloat16):
        grad = (gradients(n, device) * 1e-2).to(dtype).reshape(-1, 64)
        buf = (gradients(n, device, seed=5) * 1e-3).to(dtype).reshape(-1, 64)
        h, b0 = phi64(grad, p), buf.double()
        update = dispatch.muon_momentum_(grad, buf, mu, p, nesterov=True)
        ref_buf = b0 + (1 - mu) * (h - b0)
        error = max(scaled_error(buf, ref_buf), scaled_error(update, h + mu * (ref_buf - h)))
        rows.append(dict(check=f"MuonPower momentum (Nesterov), {str(dtype)[6:]}", path=path_of(grad), error=error,
                         unit="eps*max|ref|", bound=STATE_K))  # fmt: skip
    return rows


def check_grad_scaler(device: str, p: float) -> list[dict]:
    """fp16 autocast + GradScaler + attach(fused AdamW) == fused AdamW on phi(unscaled g), one step.

    One step: after it the two runs' parameters differ by ulps, which later fp16 forward passes can turn
    into different gradient roundings, so further steps would compare fp16 noise, not GradPower.
    """
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)]
    models.append(copy.deepcopy(models[0]))
    before = [q.detach().clone() for q in models[0].parameters()]
    attached = gp.attach(torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True), p)
    reference = torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)).to(device)
    scales = []
    for model, opt in zip(models, (attached, reference), strict=True):
        scaler = torch.amp.GradScaler(device)
        with torch.autocast(device, dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if opt is reference:  # the reference: unscale, then phi in float64
            scaler.unscale_(opt)
            for q in model.parameters():
                q.grad.copy_(phi64(q.grad, p))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    stepped = scales == [65536.0] * 2 and all(not torch.equal(a, b) for a, b in zip(before, models[0].parameters(), strict=True))
    error = max(scaled_error(a.detach(), b.detach()) for a, b in zip(*(m.parameters() for m in models), strict=True))
    path = path_of(next(models[0].parameters()))
    return [dict(check="fp16 autocast + GradScaler (s = 65536) + attach(fused AdamW), one step",
                 path=path, error=error if stepped else float("inf"), unit="eps*max|ref|", bound=STATE_K)]  # fmt: skip


def copy_bandwidth_gbps(device: str, numel: int) -> float:
    """Measured read + write bandwidth of a device copy (the practical peak for a streaming kernel)."""
    src, dst = torch.empty(numel, device=device), torch.empty(numel, device=device)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * numel / statistics.median(times) / 1e9


def time_optimizer_steps(device: str, model_config: str, steps: int) -> dict:
    """Median time of each optimizer's clipped step (clipping + step) on its own copy of the model, interleaved."""
    names = [n for pair in PAIRS for n in pair]
    config = load_model_config(model_config)
    models = {}
    for n in names:
        torch.manual_seed(0)
        models[n] = AutoModelForCausalLM.from_config(config).to(device)
    optimizers = {n: build(models[n], n) for n in names}
    gen = torch.Generator().manual_seed(1)
    saved = [(torch.randn(q.shape, generator=gen) * 1e-3).to(device) for q in models[names[0]].parameters()]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps + 2):  # two warm-up steps (JIT compiles, state allocation)
        for n in names:
            for q, g in zip(models[n].parameters(), saved, strict=True):
                q.grad = g.clone()
            sync(device)
            t0 = time.perf_counter()
            with gpu_check.no_sync_allowed(torch.device(device)):
                clipped_step(n, optimizers[n], models[n])
            sync(device)
            if i >= 2:
                times[n].append(time.perf_counter() - t0)
    numel = sum(q.numel() for q in models[names[0]].parameters())
    median = {n: statistics.median(t) for n, t in times.items()}
    return {
        "parameters": numel, "median_ms": {n: 1e3 * t for n, t in median.items()},
        "ratio": {power: median[power] / median[base] for base, power in PAIRS},
        "gbps": {n: STEP_BYTES[n] * numel / median[n] / 1e9 for n in STEP_BYTES},
        "state_bytes": {n: state_bytes(o) for n, o in optimizers.items()},
        "phi_path": path_of(saved[0]),
    }  # fmt: skip


def trainer_run(optim: str, size: dict, output_dir: Path) -> list[float]:
    """Seconds of each optimizer step of one run_pretrain run (its final evaluation cut to 2 sequences)."""
    timer = StepTimer()
    run(["--model_config", size["model_config"], "--optim", optim, "--max_steps", str(size["e2e_steps"]),
         "--seq_len", str(size["seq_len"]), "--global_batch_size", str(size["batch"]),
         "--per_device_train_batch_size", str(size["batch"]), "--eval_strategy", "no", "--save_strategy", "no",
         "--max_eval_blocks", "2", "--logging_steps", str(size["e2e_steps"]), "--disable_tqdm", "true",
         "--output_dir", str(output_dir)], callbacks=[timer])  # fmt: skip
    return timer.durations


def trainer_throughput(device: str, size: dict) -> dict:
    """Tokens/s of AdamPower vs AdamW through run_pretrain (bf16 on GPU), and each run's peak memory."""
    times: dict[str, list[list[float]]] = {o: [] for o in OPTIMIZERS}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(size["e2e_rounds"]):
            for optim in OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]:
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                times[optim].append(trainer_run(optim, size, Path(tmp) / f"round{r}" / optim))
                if device == "cuda":
                    peak[optim] = max(peak.get(optim, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    summary = summarize(times, size["e2e_warmup"], size["batch"] * size["seq_len"])
    return {**summary, "peak_gib": peak, "bf16": device == "cuda" and torch.cuda.is_bf16_supported()}


def markdown(result: dict) -> str:
    dev, step, e2e = result["device"], result["step"], result["trainer"]
    ok = all(r["error"] <= r["bound"] for r in result["correctness"])
    ok = ok and all(line.startswith("PASS") for line in result["first_contact"])
    lines = [f"# GradPower GPU check on {dev} ({result['size']} sizes)", "",
             f"torch {result['torch']}, triton {result['triton']}, p = {result['p']}. Correctness: "
             f"**{'all checks pass' if ok else 'FAILED'}**.", ""]  # fmt: skip
    if result["device_type"] != "cuda":
        lines += ["**No GPU figure: this report comes from the CPU path** (same code, small sizes); the GPU "
                  "targets below do not apply to it.", ""]  # fmt: skip
    lines += ["## First contact (self-checks, Trainer steps)", "", "```", *result["first_contact"], "```", "",
              "## 1. Correctness against float64", "", "| check | path | max error | bound | result |",
              "|---|---|---:|---:|---|"]  # fmt: skip
    for r in result["correctness"]:
        verdict = "pass" if r["error"] <= r["bound"] else "FAIL"
        lines.append(f"| {r['check']} | {r['path']} | {r['error']:.2f} {r['unit']} | {r['bound']:g} | {verdict} |")
    lines += ["", f"## 2. Clipped optimizer step (clip to norm 1.0 + step, the Trainer's default path), {result['model_config']} ({step['parameters'] / 1e6:.1f}M fp32 parameters), "
              f"median of {result['steps']} interleaved steps", "",
              f"phi path: `{step['phi_path']}`. Copy bandwidth measured on this device: {result['copy_gbps']:.1f} GB/s; "
              f"spec-sheet peak: {result['peak_gbps'] or 'unknown'} GB/s. Host load average at start: "
              f"{result['load_average']:.1f} on {result['cpus']} logical CPUs (timings from a busy host are "
              "not comparable).", "",
              "| optimizer | step (ms) | ratio | target | bytes/param | achieved GB/s | state (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for base, power in PAIRS:
        for n in (base, power):
            ratio = f"{step['ratio'][n]:.3f}x" if n in step["ratio"] else ""
            target = f"<= {TARGETS[n]}x" if n in TARGETS and result["device_type"] == "cuda" else ""
            nbytes = STEP_BYTES.get(n, "")
            gbps = f"{step['gbps'][n]:.1f}" if n in step["gbps"] else ""
            lines.append(f"| {n} | {step['median_ms'][n]:.2f} | {ratio} | {target} | {nbytes} | {gbps} | "
                         f"{step['state_bytes'][n] / 2**20:.1f} |")  # fmt: skip
    lines += ["", "Bytes per fp32 parameter: AdamW with clipping 40 (norm 4, scaling 8, AdamW 28); AdamPower's default "
              "path 32 (the norm of phi(g) 4, one AdamW pass with phi and the clip coefficient 28). Muon's cost is "
              "dominated by Newton-Schulz matmuls.", "",
              f"## 3. Trainer, {result['model_config']}, {result['size_e2e']}", "",
              "| optimizer | median step (ms) | tokens/s | peak memory (GiB) |", "|---|---:|---:|---:|"]  # fmt: skip
    for o in OPTIMIZERS:
        peak = e2e["peak_gib"].get(o)
        lines.append(f"| {o} | {e2e['optimizers'][o]['median_step_s'] * 1e3:.1f} | "
                     f"{e2e['optimizers'][o]['tokens_per_s']:,.0f} | {f'{peak:.2f}' if peak else 'n/a (CPU)'} |")  # fmt: skip
    lines += ["", f"AdamPower / AdamW tokens/s: **{e2e['ratio']:.3f}**"
              + (" (target >= 0.99)" if result["device_type"] == "cuda" else "") + ".", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on cuda, small on cpu")
    parser.add_argument("--p", type=float, default=gp.DEFAULT_POWER)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    gp.validate_power(args.p)
    size_name = args.size or ("full" if args.device == "cuda" else "small")
    size = SIZES[size_name]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({cpu_model()})"
    n = size["phi_numel"]
    first_contact = [check.line() for check in gpu_check.quick(torch.device(args.device), size["quick_steps"])]
    correctness = (check_phi(args.device, n, args.p) + check_adampower(args.device, n, args.p)
                   + check_muon_momentum(args.device, n, args.p) + check_grad_scaler(args.device, args.p))  # fmt: skip
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {
        "load_average": load_average, "cpus": os.cpu_count(), "device": name, "device_type": args.device, "size": size_name, "p": args.p, "torch": torch.__version__,
        "triton": __import__("triton").__version__ if triton.triton_available() else "not installed",
        "first_contact": first_contact, "correctness": correctness, "model_config": size["model_config"], "steps": size["steps"],
        "step": time_optimizer_steps(args.device, size["model_config"], size["steps"]),
        "copy_gbps": copy_bandwidth_gbps(args.device, n * 16),
        "peak_gbps": next((v for k, v in PEAK_GBPS.items() if k in name), None),
        "size_e2e": f"{size['e2e_steps']} steps of {size['batch']} x {size['seq_len']} tokens, "
                    f"{size['e2e_rounds']} round(s), first {size['e2e_warmup']} steps dropped",
        "trainer": trainer_throughput(args.device, size),
    }  # fmt: skip
    report = markdown(result)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{args.device}"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
