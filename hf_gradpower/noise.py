"""Gradient noise scale during training (McCandlish et al. 2018, App. A.1), cheap enough to leave on.

The two-batch estimator. A step's gradient ``G_big`` averages ``M`` small-batch gradients ``g_i`` (the
micro-batches of gradient accumulation, on every rank) of ``B_small`` sequences each, ``B_big = M B_small``.
With ``E|g|^2 = |G|^2 + tr(Sigma) / B`` for a batch of ``B``, the unbiased estimates are::

    |G|^2     = (B_big |G_big|^2 - B_small mean_i |g_i|^2) / (B_big - B_small)
    tr(Sigma) = (mean_i |g_i|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the noise scale ``B_simple = EMA[tr(Sigma)] / EMA[|G|^2]`` (a ratio of EMAs: one step's estimates are
noisy and can be negative). ``B_simple`` is the batch at which the noise equals the signal.

How ``|g_i|^2`` is seen: a tensor hook on every parameter receives each backward's gradient *before* it is
accumulated into ``.grad`` — the micro-batch's own contribution ``c_i`` — and on a DDP rank before the
all-reduce (DDP reduces in hooks on the gradient accumulator, which run after tensor hooks). One route
covers accumulation and DDP, and leaves DDP's single comm-hook slot to the user (fp16 compression...).
Trainer scales each micro-batch's loss so that ``.grad`` is the mean of the ``M`` micro-batch gradients,
hence ``g_i = k c_i`` with ``k`` micro-batches per rank (equal-sized micro-batches, as packed pre-training
batches are). ``|G_big|^2`` is read from ``.grad`` when :meth:`GradientNoiseMeter.measure` is called: after
the all-reduce, before phi and clipping (``GradPowerTrainer`` calls it there).

Cost per micro-batch: one norm per gradient tensor (no copy); per step: one norm per tensor and, under
DDP, an all-reduce of one number per group. Estimates are per optimizer param group and in total. To
measure only some steps, :meth:`start` before those steps and :meth:`stop` after them (``GradPowerTrainer``
measures every ``gradpower_noise_every``-th step): unmeasured steps have no hooks and pay nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.95  # EMA over ~20 measurements: smooths single-step estimates, follows the change over training
# GradPowerTrainer measures every 4th optimizer step by default: measuring every step (a Python hook and a norm per
# gradient tensor per micro-batch) cost +3.8% / +8.1% of a tiny-model CPU step at 1 / 2 threads, every 4th step
# +0.6% / -0.2% (+-1.5%, benchmarks/noise_overhead.py, AMD EPYC Zen 4)
DEFAULT_NOISE_EVERY = 4


class GradientNoiseMeter:
    """Measure ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` per parameter group from the raw gradients.

    ``param_groups``: lists of parameters (or an optimizer's ``param_groups``); ``micro_batch_size``:
    sequences per micro-batch per rank (``B_small``). Call :meth:`start` once, :meth:`measure` once per
    optimizer step with the gradients complete and untransformed, :meth:`stats` to read the EMAs.
    """

    def __init__(self, param_groups: Iterable, micro_batch_size: int, beta: float = DEFAULT_BETA) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.groups = [list(g["params"] if isinstance(g, dict) else g) for g in param_groups]
        self.numel = [sum(p.numel() for p in g) for g in self.groups]
        self.micro_batch_size = micro_batch_size
        self.beta = beta
        n = len(self.groups) + 1  # last entry: all groups together
        self.ema_grad_sq = torch.zeros(n, dtype=torch.float64)
        self.ema_trace = torch.zeros(n, dtype=torch.float64)
        self.steps = 0
        self.last_batch_size = 0  # B_big of the last measured step
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.groups]
        self._counts: dict[int, int] = {}
        self._handles: list = []
        self._warned = False

    # ------------------------------------------------------------------ hooks
    def start(self) -> GradientNoiseMeter:
        """Register the per-parameter gradient hooks (idempotent)."""
        if self._handles:
            return self
        for gi, group in enumerate(self.groups):
            for param in group:
                if param.requires_grad:
                    self._handles.append(param.register_hook(self._hook(gi, id(param))))
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, gi: int, key: int):
        def on_grad(grad: torch.Tensor) -> None:
            grad = grad.detach()
            if grad.dtype not in (torch.float32, torch.float64):
                grad = grad.float()
            self._pending[gi].append(torch.linalg.vector_norm(grad))  # squared, in float64, in measure()
            self._counts[key] = self._counts.get(key, 0) + 1

        return on_grad

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def measure(self, grad_scale: torch.Tensor | float | None = None) -> bool:
        """Fold this step's micro-batch norms and ``.grad`` into the EMAs; False if nothing to measure.

        Call after the last backward (and the DDP all-reduce), before phi and clipping. ``grad_scale``:
        the fp16 loss scale the gradients still carry, if any. A second call in the same step is a no-op.
        """
        if not self._counts:
            return False
        k = max(self._counts.values())
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        device = next((t.device for ts in self._pending for t in ts), torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        local = torch.stack([_sum_sq(ts) if ts else zero for ts in self._pending])
        self._pending = [[] for _ in self.groups]
        self._counts = {}
        b_small, b_big = self.micro_batch_size, self.micro_batch_size * k * world
        if b_big == b_small:
            if not self._warned:
                logger.warning("gradient noise needs >= 2 micro-batches per step (gradient accumulation or "
                               "several processes); this step has one, so no noise is measured")
                self._warned = True
            return False
        if world > 1:
            dist.all_reduce(local)
        small = local * (k / world)  # mean over the k * world micro-batches of |g_i|^2
        big = torch.stack([_grad_sq(group, device) for group in self.groups])
        if grad_scale is not None:
            scale_sq = torch.as_tensor(grad_scale, dtype=torch.float64, device=device) ** 2
            small, big = small / scale_sq, big / scale_sq
        small = torch.cat([small, small.sum().reshape(1)])
        big = torch.cat([big, big.sum().reshape(1)])
        grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
        # the EMAs live on the gradients' device: no host sync per step, only when stats() is read
        self.ema_grad_sq = self.ema_grad_sq.to(device).mul_(self.beta).add_(grad_sq, alpha=1 - self.beta)
        self.ema_trace = self.ema_trace.to(device).mul_(self.beta).add_(trace, alpha=1 - self.beta)
        self.steps += 1
        self.last_batch_size = b_big
        return True

    # ------------------------------------------------------------------ results
    def stats(self, group: int = -1) -> dict[str, float]:
        """Bias-corrected EMAs of ``|G|^2`` and ``tr(Sigma)``, ``B_simple``, ``numel`` of a group (-1: all)."""
        if self.steps == 0:
            return {}
        correction = 1.0 - self.beta**self.steps
        grad_sq = float(self.ema_grad_sq[group]) / correction
        trace = float(self.ema_trace[group]) / correction
        numel = self.numel[group] if group >= 0 else sum(self.numel)
        b_simple = trace / grad_sq if grad_sq > 0 else math.inf
        return {"grad_sq": grad_sq, "trace_cov": trace, "b_simple": b_simple, "numel": numel,
                "batch_size": self.last_batch_size}

    def state_dict(self) -> dict:
        """JSON-able state (floats round-trip exactly), for checkpoints."""
        return {"steps": self.steps, "last_batch_size": self.last_batch_size,
                "ema_grad_sq": self.ema_grad_sq.tolist(), "ema_trace": self.ema_trace.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ema_grad_sq"]) != len(self.groups) + 1:
            raise ValueError(f"noise state has {len(state['ema_grad_sq']) - 1} groups, the optimizer "
                             f"{len(self.groups)}: it belongs to a different optimizer layout")
        self.steps = int(state["steps"])
        self.last_batch_size = int(state.get("last_batch_size", 0))
        self.ema_grad_sq = torch.tensor(state["ema_grad_sq"], dtype=torch.float64)
        self.ema_trace = torch.tensor(state["ema_trace"], dtype=torch.float64)


def _sum_sq(norms: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of a list of 0-d norms, in float64 (norms of float32 and float64 tensors may mix)."""
    if len({t.dtype for t in norms}) > 1:
        norms = [t.double() for t in norms]
    return torch.stack(norms).double().square().sum()


def _grad_sq(params: Sequence[torch.Tensor], device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm([g if g.dtype in (torch.float32, torch.float64) else g.float() for g in grads])
    return torch.stack(norms).double().square().sum().to(device)


@torch.no_grad()
def adam_snr(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Signal-to-noise of each tensor from Adam's own moments, at no extra memory.

    Per tensor ``|m_hat|^2 / (sum(v_hat) - |m_hat|^2)`` with the bias-corrected EMAs ``m_hat ~ E[u]`` and
    ``v_hat ~ E[u^2]`` of what the optimizer is fed (``u = phi_p(g)`` under GradPower): the ratio of the
    squared mean to the variance over time. Returns the median over tensors and the ratio of the sums.
    Empty when the optimizer keeps no ``exp_avg``/``exp_avg_sq`` (e.g. Muon's matrices, SGD).
    """
    signal, second, ratios = 0.0, 0.0, []
    for group in optimizer.param_groups:
        betas = group.get("betas")
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if betas is None or "exp_avg" not in state or "exp_avg_sq" not in state:
                continue
            step = float(state["step"]) if "step" in state else 0.0
            if step <= 0:
                continue
            m_sq = float(torch.linalg.vector_norm(state["exp_avg"].float())) ** 2 / (1 - betas[0] ** step) ** 2
            v_sum = float(state["exp_avg_sq"].float().sum()) / (1 - betas[1] ** step)
            signal, second = signal + m_sq, second + v_sum
            ratios.append(m_sq / max(v_sum - m_sq, 1e-30))
    if not ratios:
        return {}
    ratios.sort()
    return {"adam_snr": signal / max(second - signal, 1e-30), "adam_snr_median": ratios[len(ratios) // 2]}
