"""Gradient noise meter: recovers a known |G|^2 and tr(Sigma) through accumulation and through 2-process DDP.

Synthetic gradients: a linear loss ``-theta . xbar`` whose gradient is minus the mean of ``B_small`` samples
``x ~ N(mu, Sigma)`` (diagonal ``Sigma``), so ``|G|^2 = |mu|^2`` and ``tr(Sigma)`` are known exactly. The
per-step estimates are unbiased; over the steps their mean must lie within 4 standard errors of the truth,
and the standard error must be under 3% of it (so a 15% bias, e.g. a wrong ``k`` or ``B`` factor, fails).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_gradpower.noise import GradientNoiseMeter, adam_snr

DIM, B_SMALL, STEPS = 256, 4, 300


def truth():
    g = torch.Generator().manual_seed(123)
    mu = torch.randn(DIM, generator=g, dtype=torch.float64) * 0.25
    var = 0.5 + 1.5 * torch.rand(DIM, generator=g, dtype=torch.float64)
    return mu, var


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(DIM // 2, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(DIM // 2, dtype=torch.float64))

    def forward(self, x):  # gradient wrt (a, b) is -x
        return -(torch.cat([self.a, self.b]) * x).sum()


def draw_mean(gen, mu, var):
    x = mu + var.sqrt() * torch.randn(B_SMALL, DIM, generator=gen, dtype=torch.float64)
    return x.mean(0)


def run_steps(model, meter, k, gen, mu, var, no_sync=None):
    """Per-step (|G|^2, tr Sigma) with Trainer's scaling: each of k micro-batch losses divided by k."""
    out = []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        for i in range(k):
            ctx = no_sync() if (no_sync is not None and i < k - 1) else _null()
            with ctx:
                (model(draw_mean(gen, mu, var)) / k).backward()
        assert meter.measure()
        s = meter.stats()
        out.append((s["grad_sq"], s["trace_cov"]))
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def check(estimates, mu, var):
    for idx, true in ((0, float(mu.square().sum())), (1, float(var.sum()))):
        xs = torch.tensor([e[idx] for e in estimates], dtype=torch.float64)
        mean, se = float(xs.mean()), float(xs.std() / math.sqrt(len(xs)))
        assert se < 0.03 * true, (idx, se, true)
        assert abs(mean - true) < 4 * se, (idx, mean, true, se)


def test_accumulation_recovers_known_signal_and_noise():
    mu, var = truth()
    model = Linear()
    meter = GradientNoiseMeter([[model.a], [model.b]], micro_batch_size=B_SMALL, beta=0.0).start()
    check(run_steps(model, meter, 4, torch.Generator().manual_seed(0), mu, var), mu, var)
    # per group: each half of the coordinates
    half = DIM // 2
    s0 = meter.stats(0)
    assert s0["numel"] == half and meter.stats()["numel"] == DIM
    assert meter.stats()["batch_size"] == 4 * B_SMALL


def test_ema_ratio_and_state_round_trip():
    mu, var = truth()
    model = Linear()
    meter = GradientNoiseMeter([[model.a, model.b]], micro_batch_size=B_SMALL, beta=0.99).start()
    run_steps(model, meter, 2, torch.Generator().manual_seed(1), mu, var)
    b_simple = meter.stats()["b_simple"]
    assert b_simple == pytest.approx(float(var.sum() / mu.square().sum()), rel=0.1)
    clone = GradientNoiseMeter([[model.a, model.b]], micro_batch_size=B_SMALL, beta=0.99)
    clone.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    assert clone.stats() == meter.stats()  # exact: floats round-trip through JSON


def test_one_micro_batch_measures_nothing_and_second_call_is_a_no_op():
    model = Linear()
    meter = GradientNoiseMeter([list(model.parameters())], micro_batch_size=B_SMALL).start()
    model(torch.ones(DIM, dtype=torch.float64)).backward()
    assert not meter.measure() and meter.steps == 0
    for _ in range(2):
        model(torch.ones(DIM, dtype=torch.float64)).backward()
    assert meter.measure() and not meter.measure() and meter.steps == 1
    meter.stop()
    model(torch.ones(DIM, dtype=torch.float64)).backward()
    assert not meter.measure()


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mu, var = truth()
        model = nn.parallel.DistributedDataParallel(Linear())
        meter = GradientNoiseMeter([list(model.module.parameters())], micro_batch_size=B_SMALL, beta=0.0).start()
        estimates = run_steps(model, meter, 2, torch.Generator().manual_seed(100 + rank), mu, var, model.no_sync)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"estimates": estimates, "batch": meter.stats()["batch_size"]}, f)
        else:
            with open(out_file + ".1", "w") as f:
                json.dump({"estimates": estimates}, f)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_recovers_known_signal_and_noise(tmp_path):
    out = str(tmp_path / "est.json")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    with open(out) as f:
        result = json.load(f)
    with open(out + ".1") as f:
        other = json.load(f)
    assert result["batch"] == 2 * 2 * B_SMALL  # 2 ranks x 2 micro-batches
    assert result["estimates"] == other["estimates"]  # every rank agrees (all-reduced)
    mu, var = truth()
    check(result["estimates"], mu, var)


def test_adam_snr_matches_a_float64_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 5, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.99))
    for _ in range(7):
        w.grad = torch.randn_like(w) + 0.5
        opt.step()
    st = opt.state[w]
    m = st["exp_avg"] / (1 - 0.9**7)
    v = st["exp_avg_sq"] / (1 - 0.99**7)
    want = float(m.square().sum() / (v.sum() - m.square().sum()))
    got = adam_snr(opt)
    assert got["adam_snr"] == pytest.approx(want, rel=1e-6)  # float32 reductions
    assert got["adam_snr_median"] == pytest.approx(want, rel=1e-6)  # float32 reductions
    assert adam_snr(torch.optim.SGD([w], lr=0.1)) == {}


