"""Theory toy (paper Section 4.1): closed-form AdamPower limit vs Monte Carlo and vs the real optimizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.theory_toy import grid_argmax, p_star_estimate, simulate_updates
from hf_gradpower.p_theory import best_power, limit_update, moments

MU = 1e-4
EPS = 1e-8
LOW = (0.25 * MU, 0.5 * MU, 0.75 * MU)  # sigma < mu
HIGH = (2 * MU, 5 * MU, 10 * MU, 50 * MU)  # sigma > mu
SIM_SIGMAS = (0.5 * MU, 5 * MU, 10 * MU)
SIM_POWERS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)
# Tolerance for the real-optimizer simulation vs the beta -> 1 limit: 5 standard errors (statistics)
# plus 0.3% relative (finite-beta bias of E[m/sqrt(v)] ~ O(1/steps), burn-in).
N_SE, REL_BIAS = 5.0, 3e-3


@pytest.fixture(scope="module")
def sim():
    mean, err = simulate_updates(MU, SIM_SIGMAS, SIM_POWERS, eps=EPS, steps=1500, n=512, seed=1, burn_in=500)
    return mean, err


def _tol(closed, err):
    return N_SE * err + REL_BIAS * np.abs(closed)


@pytest.mark.parametrize("ratio", [0.25, 0.75, 2.0, 10.0, 50.0])
@pytest.mark.parametrize("p", [0.3, 1.0, 1.7, 2.5])
def test_closed_form_moments_match_monte_carlo(ratio, p):
    sigma = ratio * MU
    g = np.random.default_rng(123).uniform(MU - sigma, MU + sigma, size=1_000_000)
    phi = np.sign(g) * np.abs(g) ** p
    m1, m2 = moments(MU, sigma, p)
    for sample, exact in ((phi, m1), (phi**2, m2)):
        se = sample.std() / math.sqrt(sample.size)
        assert abs(sample.mean() - exact) < 5 * se, (ratio, p, sample.mean(), exact, se)


def test_moments_are_continuous_at_sigma_equals_mu():
    for p in (0.5, 1.0, 2.0):
        lo, hi = moments(MU, MU * (1 - 1e-9), p), moments(MU, MU * (1 + 1e-9), p)
        np.testing.assert_allclose(lo, hi, rtol=1e-6)
        np.testing.assert_allclose(moments(MU, MU, p), lo, rtol=1e-6)


def test_simulation_through_real_optimizer_matches_limit(sim):
    mean, err = sim
    for j, sigma in enumerate(SIM_SIGMAS):
        closed = limit_update(MU, sigma, np.asarray(SIM_POWERS), EPS)
        diff = np.abs(mean[:, j] - closed)
        assert np.all(diff < _tol(closed, err[:, j])), (sigma, mean[:, j], closed, err[:, j])
        assert np.all(diff / closed < 0.01)  # stated accuracy: within 1% everywhere


def test_best_power_low_noise_below_one():
    for sigma in LOW:
        grid = np.linspace(0.05, 3.0, 60)
        for eps in (0.0, EPS):
            assert np.all(np.diff(limit_update(MU, sigma, grid, eps)) < 0)  # Prop. 4.2: decreasing in p
            assert best_power(MU, sigma, eps) == pytest.approx(0.05, abs=1e-5)
        assert limit_update(MU, sigma, 1e-4, 0.0) == pytest.approx(1.0, abs=1e-3)  # max update ~1 as p -> 0


def test_best_power_high_noise_above_one_and_interior():
    for sigma in HIGH:
        p_star = best_power(MU, sigma, EPS, p_max=8.0)
        assert 1.0 < p_star < 8.0, (sigma, p_star)
        assert limit_update(MU, sigma, p_star, EPS) > limit_update(MU, sigma, 1.0, EPS)
    # noise-dominated: eps sets p*; the fixed-point estimate is tight and below log(1/eps)/log(1/(mu+sigma))
    for sigma in (10 * MU, 50 * MU, 200 * MU):
        p_star = best_power(MU, sigma, EPS)
        assert p_star_estimate(MU, sigma, EPS) == pytest.approx(p_star, abs=0.1)
        assert p_star < math.log(1 / EPS) / math.log(1 / (MU + sigma))


def test_best_power_grows_as_eps_shrinks():
    for sigma in (5 * MU, 10 * MU, 50 * MU):
        p = [best_power(MU, sigma, eps, p_max=12.0) for eps in (1e-6, 1e-8, 1e-10)]
        assert p[0] < p[1] < p[2], (sigma, p)
        assert p[0] > 1.0


def test_simulated_best_power_regimes(sim):
    mean, _ = sim
    low, *high = range(len(SIM_SIGMAS))
    assert grid_argmax(SIM_POWERS, mean[:, low]) < 1.0
    assert np.all(np.diff(mean[:, low]) < 0)
    for j, sigma in zip(high, SIM_SIGMAS[1:], strict=True):
        p_sim = grid_argmax(SIM_POWERS, mean[:, j])
        assert p_sim > 1.0
        closed = limit_update(MU, sigma, np.asarray(SIM_POWERS), EPS)
        assert p_sim == pytest.approx(grid_argmax(SIM_POWERS, closed), abs=0.02)  # same grid + parabola
        assert p_sim == pytest.approx(best_power(MU, sigma, EPS), abs=0.1)  # coarse-grid interpolation


def test_gradpower_is_applied(sim):
    """Without phi_p the p = 1.5 run would equal the p = 1 run (plain AdamW); it must match u(1.5) instead."""
    mean, err = sim
    i1, i15 = SIM_POWERS.index(1.0), SIM_POWERS.index(1.5)
    for j, sigma in enumerate(SIM_SIGMAS):
        u1, u15 = limit_update(MU, sigma, 1.0, EPS), limit_update(MU, sigma, 1.5, EPS)
        tol = _tol(u15, err[i15, j])
        assert abs(mean[i15, j] - u15) < tol
        assert abs(mean[i15, j] - mean[i1, j]) > 3 * tol, (sigma, mean[i15, j], mean[i1, j], tol)
        assert abs(mean[i1, j] - u1) < _tol(u1, err[i1, j])  # and p = 1 is plain Adam's limit


def test_simulate_update_float32_close_to_float64():
    """The benchmark runs float64 parameters; float32 (same draws) agrees to 1e-3, so either is adequate."""
    import torch

    mean64, _ = simulate_updates(MU, [10 * MU], [1.5], steps=300, n=64, seed=3, burn_in=100)
    mean32, _ = simulate_updates(
        MU, [10 * MU], [1.5], steps=300, n=64, seed=3, burn_in=100, dtype=torch.float32
    )
    assert mean32[0, 0] == pytest.approx(mean64[0, 0], rel=1e-3)
