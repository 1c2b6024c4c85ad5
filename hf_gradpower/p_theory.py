"""The paper's Example 4.1 in closed form, and the ``auto`` rule that turns a measured gradient noise into p.

Example 4.1: each coordinate's stochastic gradient is ``g ~ Unif(mu - sigma, mu + sigma)`` and AdamPower's
update tends (``b1, b2 -> 1``) to ``u(p) = E[phi_p(g)] / (sqrt(E[phi_p(g)^2]) + eps)`` (the paper's eq. 3).
``best_power`` maximises ``u`` over ``p``: low noise (``sigma <= mu``) wants the smallest ``p`` (Prop. 4.2),
noise-dominated gradients an interior ``p > 1`` set by ``eps`` (Prop. 4.3). ``benchmarks/theory_toy.py``
derives the moments and checks them, and ``u``, against Monte Carlo and the real optimizer.

The ``auto`` rule (:func:`auto_power`) maps a parameter group's measured noise onto that toy: the batch
gradient's mean per coordinate is the rms ``mu = sqrt(|G|^2 / n)``, its noise per coordinate has variance
``tr(Sigma) / (B n)`` and a uniform law of that variance has half-width ``sigma = sqrt(3 tr(Sigma) / (B n))``.
So ``sigma / mu = sqrt(3 B_simple / B)``: the ratio of the noise scale to the batch decides the regime,
the absolute scale of ``sigma`` against ``eps`` decides how far above 1 the best ``p`` lies. The result is
clamped to a safe range (default ``[0.9, 1.2]``: 1.2 is the paper's default and our long-regime winner,
0.9 the best of our short-regime p sweep) because the toy's optimum is flat and far outside it when the
noise is extreme, while the real loss surface was only tested inside it.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-8
AUTO_RANGE = (0.9, 1.2)


def moments(mu: float, sigma: float, p: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[phi_p(g)], E[phi_p(g)^2])`` for ``g ~ Unif(mu - sigma, mu + sigma)``, ``mu > 0``, ``sigma > 0``, ``p > 0``."""
    if mu <= 0 or sigma <= 0:
        raise ValueError(f"need mu > 0 and sigma > 0, got mu={mu}, sigma={sigma}")
    p = np.asarray(p, dtype=np.float64)
    a = mu + sigma
    b = abs(mu - sigma)
    sign = -1.0 if sigma <= mu else 1.0  # low noise: (a^k - b^k); high noise: b's half is negative
    m1 = (a ** (p + 1) - b ** (p + 1)) / (2 * sigma * (p + 1))
    m2 = (a ** (2 * p + 1) + sign * b ** (2 * p + 1)) / (2 * sigma * (2 * p + 1))
    return m1, m2


def limit_update(mu: float, sigma: float, p: float | np.ndarray, eps: float = EPS) -> np.ndarray:
    """The paper's limiting AdamPower update (3): ``E[phi_p(g)] / (sqrt(E[phi_p(g)^2]) + eps)``."""
    m1, m2 = moments(mu, sigma, p)
    return m1 / (np.sqrt(m2) + eps)


def best_power(
    mu: float, sigma: float, eps: float = EPS, p_min: float = 0.05, p_max: float = 8.0, tol: float = 1e-6
) -> float:
    """The ``p`` in ``[p_min, p_max]`` maximising :func:`limit_update` (dense grid, then golden section).

    Returns ``p_min`` when ``u`` decreases over the whole range (low noise: the supremum is ``p -> 0``).
    """
    grid = np.linspace(p_min, p_max, 801)
    k = int(np.argmax(limit_update(mu, sigma, grid, eps)))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    while hi - lo > tol:
        x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        if limit_update(mu, sigma, x1, eps) >= limit_update(mu, sigma, x2, eps):
            hi = x2
        else:
            lo = x1
    return float(np.clip((lo + hi) / 2, p_min, p_max))


def auto_power(
    grad_sq: float, trace_cov: float, numel: int, batch_size: int, eps: float = EPS,
    p_range: tuple[float, float] = AUTO_RANGE,
) -> float:
    """The ``p`` that Example 4.1 recommends for a group with ``|G|^2``, ``tr(Sigma)`` over ``numel`` coordinates.

    ``batch_size`` is the batch the optimizer's gradient averages (``tr(Sigma) / B`` is its noise). No
    measurable noise (``tr(Sigma) <= 0``) is the low-noise regime: ``p_range[0]``; no measurable signal
    (``|G|^2 <= 0``) the noise-dominated one: ``p_range[1]``.
    """
    lo, hi = p_range
    if not 0 < lo <= hi:
        raise ValueError(f"p_range must satisfy 0 < low <= high, got {p_range}")
    if not (math.isfinite(trace_cov) and trace_cov > 0):
        return lo
    if not (math.isfinite(grad_sq) and grad_sq > 0):
        return hi
    mu = math.sqrt(grad_sq / numel)
    sigma = math.sqrt(3.0 * trace_cov / (batch_size * numel))
    if lo == hi:
        return lo
    return round(best_power(mu, sigma, eps, p_min=lo, p_max=hi), 4)
