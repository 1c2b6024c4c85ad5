"""First contact with an accelerator, in about two minutes: run this before training on a new machine.

    python -m hf_gradpower.gpu_check --quick        (or the console script: hf-gradpower-gpu-check --quick)

1. the self-check of the fast kernel backend of every (dtype combination) on the device (what the dispatcher
   runs at first use: phi on special values, subnormals, partial blocks, unaligned views and a loss scale
   against float64; one AdamW step at beta2 = 0.999 against torch.optim.AdamW; one Muon momentum step);
2. 20 Trainer steps (bf16 where the device has it) each of AdamPower, MuonPower and attach(AdamW) on a tiny
   LLaMA, the optimizer steps under ``torch.cuda.set_sync_debug_mode("error")`` on CUDA: a step that syncs
   host and device fails.

One PASS/FAIL line per check names the backend that ran; the exit status is 1 if any check failed. A failed
self-check is not fatal for training (that combination falls back to eager torch ops), but it is worth
reporting with this output. Without ``--quick``, a source checkout also runs ``benchmarks.gpu_check`` (step
times, Trainer tokens/s, memory).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_gradpower.kernels import dispatch, eager, selfcheck

COMBOS = ((torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float32, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))  # fmt: skip


@dataclass
class Check:
    name: str
    backend: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<44} {self.backend:<10} {self.detail}"


def _dtypes(combo: tuple) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in combo)


def self_checks(device: torch.device) -> list[Check]:
    """The self-check of the backend that would serve each dtype combination on ``device``."""
    checks = []
    for combo in COMBOS:
        what = ("phi " if len(combo) == 1 else "AdamW + Muon momentum ") + _dtypes(combo)
        probe = torch.empty(1, dtype=combo[0], device=device)
        backend = dispatch.candidate(probe, 1.2)
        if (
            backend is not eager
            and len(combo) == 2
            and not backend.adamw_takes([probe], [probe.to(combo[1])], [probe], [probe])
        ):
            backend = eager
        if backend is eager:
            checks.append(Check(f"self-check {what}", "eager", True, "no fast kernel for this combination"))
            continue
        t0 = time.perf_counter()
        try:
            selfcheck.check(backend, device, combo)
        except Exception as exc:  # the reason is the report
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            checks.append(
                Check(f"self-check {what}", backend.NAME, False, f"{reason} (eager torch ops will serve it)")
            )
        else:
            checks.append(
                Check(f"self-check {what}", backend.NAME, True, f"{time.perf_counter() - t0:.1f} s")
            )
    return checks


class _Watch:
    """Trainer callback: the optimizer steps under the CUDA sync debug mode "error", and which backend ran."""

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.backends, self.losses = model, device, set(), []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        self.backends |= {dispatch.backend_name(g) for g in grads}
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


@contextlib.contextmanager
def no_sync_allowed(device: torch.device):
    """On CUDA, any host-device synchronisation inside the block raises (``set_sync_debug_mode("error")``)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _tokens(n: int, seq: int, vocab: int) -> list[dict]:
    """Sequences of a few repeating patterns: a tiny model's loss falls within a few steps."""
    out = []
    for i in range(n):
        row = [(i % 7 + 3 * j) % vocab for j in range(seq)]
        out.append({"input_ids": torch.tensor(row), "labels": torch.tensor(row)})
    return out


def trainer_check(name: str, build: Callable, device: torch.device, steps: int) -> Check:
    """``steps`` Trainer steps with the optimizer ``build(model)``: finite falling loss, every step counted
    once, no fallback warning, and (CUDA) no host-device sync inside an optimizer step."""
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    from hf_gradpower.model_configs import load_model_config

    torch.manual_seed(0)
    config = load_model_config("llama-tiny", vocab_size=256, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config).to(device)
    optimizer = build(model)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    watch = _Watch(model, device)
    warnings = _Warnings()
    with tempfile.TemporaryDirectory() as tmp, warnings.caught():
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3, bf16=bf16,
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=device.type == "cpu",
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=_tokens(64, 32, 256), optimizers=(optimizer, None),
                          callbacks=[watch])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # one line per check, not per step
        try:
            trainer.train()
        except Exception as exc:
            return Check(f"trainer {name}", "/".join(sorted(watch.backends)) or "?", False,
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")  # fmt: skip
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    counted = {int(s["step"]) for s in optimizer.state.values() if torch.is_tensor(s.get("step"))}
    losses = watch.losses
    ok = (len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
          and counted <= {steps} and not warnings.records)  # fmt: skip
    detail = (f"{steps} {'bf16' if bf16 else 'fp32'} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses
              else "no loss logged")  # fmt: skip
    detail += f", steps counted {sorted(counted) or 'n/a'}"
    if warnings.records:
        detail += f", fell back: {warnings.records[0][:160]}"
    return Check(f"trainer {name}", "/".join(sorted(watch.backends)), ok, detail)


class _Warnings(logging.Handler):
    """The dispatcher's fallback warnings during a run."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())

    @contextlib.contextmanager
    def caught(self):
        logger = logging.getLogger(dispatch.__name__)
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)


def optimizers() -> dict[str, Callable]:
    import hf_gradpower as gp

    return {
        "AdamPower": lambda m: gp.build_optimizer(m, "adampower", lr=1e-3),
        "MuonPower": lambda m: gp.build_optimizer(m, "muonpower", lr=1e-2),
        "attach(AdamW)": lambda m: gp.attach(torch.optim.AdamW(m.parameters(), lr=1e-3), gp.DEFAULT_POWER),
    }


def quick(device: torch.device, steps: int = 20) -> list[Check]:
    """Every check of the quick mode, in order; prints one line per check as it finishes."""
    checks = []
    for check in self_checks(device):
        print(check.line(), flush=True)
        checks.append(check)
    dispatch.reset()  # training starts from fresh choices, as a new process would
    for name, build in optimizers().items():
        check = trainer_check(name, build, device, steps)
        print(check.line(), flush=True)
        checks.append(check)
    return checks


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="self-checks and Trainer steps only (about 2 minutes)"
    )
    parser.add_argument(
        "--device", default=default_device(), help="cuda, cuda:1, xpu, cpu (default: the accelerator)"
    )
    parser.add_argument("--steps", type=int, default=20, help="Trainer steps per optimizer (default 20)")
    args, rest = parser.parse_known_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch sees no CUDA device; use --device cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"hf_gradpower first-contact check on {name}: torch {torch.__version__}, triton {_triton_version()}, "
          f"{dispatch.ENV_VAR}={dispatch.kernel_mode()}", flush=True)  # fmt: skip
    checks = quick(device, args.steps)
    failed = [c for c in checks if not c.passed]
    print(
        f"RESULT: {'FAIL' if failed else 'PASS'} ({len(checks) - len(failed)} of {len(checks)} checks pass)"
    )
    if not args.quick:
        try:
            from benchmarks.gpu_check import main as full
        except ImportError:
            print(
                "full mode (step times, tokens/s, memory) needs a source checkout: python -m benchmarks.gpu_check"
            )
        else:
            full(["--device", device.type, *rest])
    return 1 if failed else 0


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


if __name__ == "__main__":
    raise SystemExit(main())
