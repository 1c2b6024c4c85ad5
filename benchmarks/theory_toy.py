"""Theory toy (paper Section 4.1, Example 4.1, Propositions 4.2/4.3, Appendix B.2), checked end to end.

Run: ``python -m benchmarks.theory_toy [--out docs] [--quick]`` (about half a minute on 2 CPU cores).
It writes ``<out>/figures/theory_toy.png`` and ``<out>/theory_toy.md`` and prints the summary table.

Setting
-------
One flat direction, i.i.d. stochastic gradients ``g_t ~ Unif(mu - sigma, mu + sigma)`` with LLM-sized
``mu, sigma << 1``, fed to AdamPower (AdamW with GradPower, weight decay 0, ``eps = 1e-8``)::

    m_t = b1 m_{t-1} + (1 - b1) phi_p(g_t),   v_t = b2 v_{t-1} + (1 - b2) phi_p(g_t)^2,
    update_t = m_hat_t / (sqrt(v_hat_t) + eps),   phi_p(g) = sign(g) |g|^p.

In the paper's limit ``b1, b2 -> 1`` (law of large numbers on the EMAs) the update converges a.s. to::

    u(p) = E[phi_p(g)] / (sqrt(E[phi_p(g)^2]) + eps).                                          (3)

Closed-form moments (derivation)
--------------------------------
The density is ``1 / (2 sigma)`` on ``[mu - sigma, mu + sigma]``; write ``a = mu + sigma``.

* Low noise, ``sigma <= mu`` (every ``g >= 0``, ``phi_p(g) = g^p``), with ``b = mu - sigma >= 0``::

      E[g^p]    = (1/(2 sigma)) int_b^a g^p dg    = (a^(p+1)  - b^(p+1))  / (2 sigma (p + 1)),
      E[g^(2p)] = (1/(2 sigma)) int_b^a g^(2p) dg = (a^(2p+1) - b^(2p+1)) / (2 sigma (2p + 1)).

* High noise, ``sigma > mu`` (the interval straddles 0), with ``b = sigma - mu > 0``. Split at 0 and
  substitute ``g -> -g`` on the negative part, ``[-b, 0]``::

      E[phi_p(g)]   = (1/(2 sigma)) (int_0^a g^p dg - int_0^b g^p dg) = (a^(p+1) - b^(p+1)) / (2 sigma (p + 1)),
      E[phi_p(g)^2] = (1/(2 sigma)) (int_0^a + int_0^b) g^(2p) dg    = (a^(2p+1) + b^(2p+1)) / (2 sigma (2p + 1)).

  (``tests/test_theory_toy.py`` checks all four against Monte Carlo.)

Proposition 4.2 (low noise: the best p is as small as possible)
---------------------------------------------------------------
For ``eps -> 0``: ``u_0(p) = E[g^p] / sqrt(E[g^(2p)])``. With ``X = log g`` and the cumulant generating
function ``K(s) = log E[e^(sX)]`` (convex), ``log u_0(p) = K(p) - K(2p)/2`` and
``d/dp log u_0 = K'(p) - K'(2p) <= 0`` because ``K'`` is non-decreasing: ``u_0`` decreases in ``p`` for any
positive gradient law. ``u_0 <= 1`` (Cauchy-Schwarz) and ``u_0 -> 1`` as ``p -> 0`` (``g^p -> 1``): the
maximal update is ~1 (sign descent), approached as ``p -> 0``. With ``eps > 0``:
``u = u_0 / (1 + eps / sqrt(E[g^(2p)]))`` and ``E[g^(2p)]`` decreases in ``p`` when ``g < 1``, so the second
factor decreases too: ``u`` is decreasing in ``p`` for every ``eps >= 0`` (best p < 1, at the grid's low end).

Proposition 4.3 (high noise: an interior best p > 1, set by eps)
---------------------------------------------------------------
Noise-dominated limit ``mu / sigma -> 0`` (first order in ``mu``): ``E[phi_p(g)] ~ mu sigma^(p-1)`` (the
derivative of ``(a^(p+1) - b^(p+1))`` in ``mu`` at ``mu = 0`` is ``2 (p+1) sigma^p``) and
``E[phi_p(g)^2] ~ sigma^(2p) / (2p + 1)``. Hence::

      u(p) ~ (mu / sigma) / w(p),    w(p) = (2p + 1)^(-1/2) + eps sigma^(-p).

The first term of ``w`` is the "denominator dominated by sqrt(E phi^2)" regime (growing ``p`` shrinks
``sqrt(E phi^2)`` relative to ``E phi`` by ``sqrt(2p + 1)``, so the update grows); the second is the
"dominated by eps" regime (AdamPower ~ SGDPower, ``u ~ E[phi] / eps`` which shrinks as ``sigma^p``).
``w'(p) = -(2p + 1)^(-3/2) + eps log(1/sigma) sigma^(-p)`` is increasing, so ``u`` has a single maximum at
the root ``p*`` of ``eps log(1/sigma) sigma^(-p*) = (2p* + 1)^(-3/2)`` when ``eps log(1/sigma) < 1``::

      p* = [log(1/eps) - log log(1/sigma) - (3/2) log(2p* + 1)] / log(1/sigma)  <  log(1/eps) / log(1/sigma),

the ``log(1/eps) / log(1/(mu + sigma))`` scale of the paper's two-sided estimate (its exact inline
formula is lost in the text we have); :func:`p_star_estimate` solves the fixed point with ``mu + sigma`` in
place of ``sigma``. Consequences: ``p* > 1`` iff
``sigma / log(1/sigma) > 3^(3/2) eps`` (true for ``eps = 1e-8`` once ``sigma >~ 1e-6``), and ``p*`` grows as
``eps`` shrinks (the left side of the root equation increases with ``eps`` and with ``p``).

For finite ``sigma / mu`` the exact ``u`` (no ``mu -> 0`` expansion) has, already at ``eps = 0``, an optimum
at ``p ~ O(sigma / mu)`` (the numerator saturates once ``(b / a)^(p+1)`` is small): the best ``p`` is the
smaller of that and the eps-set ``p*``. For ``sigma / mu = 2`` this gives ``p ~ 1.05`` with a very flat
maximum (``u(p*) / u(1) = 1.000``), i.e. just above 1; for ``sigma / mu >= 5`` eps dominates.

Choice of scales. For the eps effect to make an interior optimum inside ``p in [0.25, 3]``, ``|g|^p`` must
reach the eps scale there: ``sigma^p ~ eps`` at ``p ~ 2-3`` means ``sigma ~ 1e-3 .. 5e-3``. We use
``mu = 1e-4`` (LLM-sized) and ``sigma / mu`` in ``0.25 .. 50``; with ``mu = 1e-3`` the ``sigma / mu = 50`` optimum
moves to ``p ~ 4.6`` (off the plotted grid) because ``sigma = 0.05`` needs a larger ``p`` to reach eps.

Simulation. :func:`simulate_updates` drives the real optimizer (``gp.build_optimizer(..., "adampower")``,
AdamW (foreach) on float64 parameters, GradPower in its step pre-hook) on a vector of independent 1-D
coordinates, feeding the sampled ``g`` as ``.grad`` at every step, and returns the time-averaged update
``(theta_before - theta_after) / lr`` after a burn-in, averaged over coordinates. Two variance reductions,
both unbiased for the same expectation: all ``p`` see the same draws (common random numbers), and
coordinates come in antithetic pairs ``g, 2 mu - g`` (each coordinate is still an i.i.d. Unif sequence);
the standard error is taken across the independent pairs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import hf_gradpower as gp
from hf_gradpower.p_theory import EPS, best_power, limit_update

MU = 1e-4
RATIOS = (0.25, 0.5, 0.75, 2.0, 5.0, 10.0, 50.0)
POWERS = tuple(float(x) for x in np.round(np.arange(0.25, 3.0001, 0.125), 4))
BETAS = (0.999, 0.99999)


# --------------------------------------------------------------------------------------- closed form
def p_star_estimate(mu: float, sigma: float, eps: float = EPS) -> float:
    """Noise-dominated (``mu << sigma``) estimate of the best ``p``: root of ``eps L s^(-p) = (2p + 1)^(-3/2)``.

    ``s = mu + sigma``, ``L = log(1/s)``; i.e. ``p = [log(1/eps) - log L - 1.5 log(2p + 1)] / L`` (fixed point).
    """
    s = mu + sigma
    big_l = math.log(1 / s)
    p = math.log(1 / eps) / big_l
    for _ in range(200):
        p = max((math.log(1 / eps) - math.log(big_l) - 1.5 * math.log(2 * p + 1)) / big_l, 0.0)
    return p


def grid_argmax(powers: Sequence[float], values: Sequence[float]) -> float:
    """Best ``p`` from values on a grid, refined by a parabola through the top point and its neighbours."""
    x = np.asarray(powers, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    k = int(np.argmax(y))
    if k == 0 or k == len(x) - 1:
        return float(x[k])
    x0, x1, x2 = x[k - 1 : k + 2]
    y0, y1, y2 = y[k - 1 : k + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denom
    return float(np.clip(-b / (2 * a), x0, x2)) if a < 0 else float(x1)


# ---------------------------------------------------------------------------------------- simulation
@torch.no_grad()
def simulate_updates(
    mu: float | Sequence[float],
    sigmas: float | Sequence[float],
    powers: float | Sequence[float],
    eps: float = EPS,
    steps: int = 3000,
    n: int = 1024,
    betas: tuple[float, float] = BETAS,
    seed: int = 0,
    burn_in: int = 1000,
    dtype: torch.dtype = torch.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean AdamPower update per step through the real optimizer: ``(mean, stderr)``, shape ``[P, S]``.

    ``n`` coordinates (``n/2`` antithetic pairs) per ``sigma``; one ``gp.build_optimizer(..., "adampower")``
    per ``p``, all fed the same draws. The update of a step is ``(theta_before - theta_after) / lr``; it is
    averaged over the ``steps`` steps after ``burn_in`` and over coordinates (stderr across pairs).
    """
    sig = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
    mus = np.broadcast_to(np.asarray(mu, dtype=np.float64), sig.shape)
    pw = np.atleast_1d(np.asarray(powers, dtype=np.float64))
    if n < 4 or n % 2:
        raise ValueError(f"n must be an even number >= 4, got {n}")
    half = n // 2
    mu_t = torch.tensor(mus, dtype=torch.float64).unsqueeze(1)  # draws in float64 whatever ``dtype`` is
    sig_t = torch.tensor(sig, dtype=torch.float64).unsqueeze(1)
    gen = torch.Generator().manual_seed(seed)
    lr = 1.0
    thetas, opts = [], []
    for p in pw:
        theta = torch.nn.Parameter(torch.zeros(len(sig), n, dtype=dtype))
        theta.grad = torch.zeros_like(theta)
        opts.append(
            gp.build_optimizer(
                [theta],
                "adampower",
                lr=lr,
                weight_decay=0.0,
                p=float(p),
                betas=betas,
                eps=eps,
                fused=False,
                foreach=True,  # same AdamW math; the fused CPU kernel is ~10x slower in float64
            )
        )
        thetas.append(theta)
    g = torch.empty(len(sig), n, dtype=torch.float64)
    start = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few thousand elements: intra-op threads only add contention
    try:
        for t in range(burn_in + steps):
            if t == burn_in:
                start = [th.detach().clone() for th in thetas]
            u = torch.rand(len(sig), half, generator=gen, dtype=torch.float64)
            torch.addcmul(mu_t, sig_t, u.mul_(2).sub_(1), out=g[:, :half])  # mu + sigma (2U - 1)
            torch.sub(2 * mu_t, g[:, :half], out=g[:, half:])  # antithetic partner 2 mu - g
            for theta, opt in zip(thetas, opts, strict=True):
                theta.grad.copy_(
                    g
                )  # (cast to ``dtype``) the GradPower hook transforms .grad in place at step()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    mean = np.empty((len(pw), len(sig)))
    err = np.empty((len(pw), len(sig)))
    for i, (theta, th0) in enumerate(zip(thetas, start, strict=True)):
        per_coord = (th0.double() - theta.detach().double()) / (
            lr * steps
        )  # time-averaged update of each coordinate
        pairs = (0.5 * (per_coord[:, :half] + per_coord[:, half:])).numpy()
        mean[i] = pairs.mean(axis=1)
        err[i] = pairs.std(axis=1, ddof=1) / math.sqrt(half)
    return mean, err


def simulate_update(
    mu: float,
    sigma: float,
    p: float,
    eps: float = EPS,
    steps: int = 3000,
    n: int = 1024,
    betas: tuple[float, float] = BETAS,
    seed: int = 0,
    burn_in: int = 1000,
) -> tuple[float, float]:
    """One ``(mu, sigma, p)``: ``(mean update, stderr)`` through the real optimizer (see :func:`simulate_updates`)."""
    mean, err = simulate_updates(mu, [sigma], [p], eps, steps, n, betas, seed, burn_in)
    return float(mean[0, 0]), float(err[0, 0])


# ----------------------------------------------------------------------------------------- reporting
def run(
    out: Path | None,
    mu: float = MU,
    ratios: Sequence[float] = RATIOS,
    powers: Sequence[float] = POWERS,
    eps: float = EPS,
    steps: int = 3000,
    n: int = 1024,
    seed: int = 0,
) -> list[dict]:
    sigmas = [r * mu for r in ratios]
    t0 = time.perf_counter()
    sim, err = simulate_updates(mu, sigmas, powers, eps=eps, steps=steps, n=n, seed=seed)
    sim_s = time.perf_counter() - t0
    rows = []
    for j, (r, s) in enumerate(zip(ratios, sigmas, strict=True)):
        closed = limit_update(mu, s, np.asarray(powers), eps)
        p_cf = best_power(mu, s, eps, p_min=min(powers), p_max=max(powers))
        p_sim = grid_argmax(powers, sim[:, j])
        rel = np.abs(sim[:, j] / closed - 1)
        rows.append(
            {
                "ratio": r,
                "sigma": s,
                "regime": "low" if s <= mu else "high",
                "p_cf": p_cf,
                "p_cf_grid": grid_argmax(powers, closed),
                "p_sim": p_sim,
                "p_est": p_star_estimate(mu, s, eps) if s > mu else float("nan"),
                "p_eps0": best_power(mu, s, 0.0, p_min=min(powers), p_max=12.0),
                "u1": float(limit_update(mu, s, 1.0, eps)),
                "u_best": float(limit_update(mu, s, p_cf, eps)),
                "max_rel_err": float(rel.max()),
                "max_z": float(np.max(np.abs(sim[:, j] - closed) / err[:, j])),
                "closed": closed,
                "sim": sim[:, j],
                "err": err[:, j],
            }
        )
    table = format_table(rows, mu, eps)
    print(table)
    print(
        f"\nsimulation: {len(powers)} powers x {len(ratios)} ratios x {n} coordinates x {steps} steps "
        f"(+1000 burn-in), betas={BETAS}, eps={eps}: {sim_s:.1f} s"
    )
    if out is not None:
        fig_path = Path(out) / "figures" / "theory_toy.png"
        plot(rows, powers, mu, eps, fig_path)
        md = Path(out) / "theory_toy.md"
        md.write_text(markdown(table, mu, eps, steps, n, len(powers)))
        print(f"wrote {fig_path} and {md}")
    return rows


def format_table(rows: list[dict], mu: float, eps: float) -> str:
    head = (
        "| sigma/mu | regime | best p (closed form) | best p (simulated) | p* estimate | best p (eps=0) "
        "| u(1) | u(best p) | u(best)/u(1) | max rel. err sim vs closed |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        est = "-" if math.isnan(r["p_est"]) else f"{r['p_est']:.2f}"
        eps0 = f"{r['p_eps0']:.2f}" if r["p_eps0"] < 11.99 else "> 12"
        lines.append(
            f"| {r['ratio']:g} | {r['regime']} | {r['p_cf']:.2f} | {r['p_sim']:.2f} | {est} | {eps0} "
            f"| {r['u1']:.4g} | {r['u_best']:.4g} | {r['u_best'] / r['u1']:.3f} | {100 * r['max_rel_err']:.2f}% |"
        )
    return "\n".join(lines)


def markdown(table: str, mu: float, eps: float, steps: int, n: int, n_powers: int) -> str:
    return f"""# Theory toy: AdamPower update magnitude vs p (paper Section 4.1, Fig. 7)

`python -m benchmarks.theory_toy --out docs`. Gradients `g ~ Unif(mu - sigma, mu + sigma)`, `mu = {mu:g}`,
AdamPower with `eps = {eps:g}`, weight decay 0. Closed form: the paper's limit `beta1, beta2 -> 1`,
`u(p) = E[phi_p(g)] / (sqrt(E[phi_p(g)^2]) + eps)` (derivation in `benchmarks/theory_toy.py`).
Simulated: the real optimizer (`gp.build_optimizer(..., "adampower")`, betas {BETAS}, float64),
{n} coordinates x {steps} steps after 1000 burn-in steps, mean update per step, {n_powers} powers in
0.25..3; best p from a parabola through the top grid points. The closed-form best p is searched in [0.25, 3]
(low noise: the lower bound, since u decreases in p). "p* estimate" is the noise-dominated fixed point
`p = [log(1/eps) - log log(1/s) - 1.5 log(2p+1)] / log(1/s)`, `s = mu + sigma`; "best p (eps=0)" is the
optimum without eps (searched up to p = 12).

{table}

![update vs p](figures/theory_toy.png)

Findings: low noise (sigma < mu) -> u decreases in p (best p < 1, u -> 1 as p -> 0: Prop. 4.2);
high noise -> interior optimum p* > 1 (Prop. 4.3). For sigma/mu >= 5 the optimum is set by eps
(p* ~ log(1/eps)/log(1/(mu+sigma)) scale; smaller eps -> larger p*); at sigma/mu = 2 the maximum is intrinsic
(it exists at eps = 0 too), barely above 1 and very flat.
"""


def plot(rows: list[dict], powers: Sequence[float], mu: float, eps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = np.linspace(min(powers), max(powers), 400)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(rows):
        c = colors[k % len(colors)]
        best = f"= {r['p_cf']:.2f}" if r["regime"] == "high" else f"-> 0 (grid edge {r['p_cf']:.2f})"
        label = f"$\\sigma/\\mu$ = {r['ratio']:g} ({r['regime']} noise), best p {best}"
        for ax, scale in ((axes[0], 1.0), (axes[1], 1.0 / r["u1"])):
            ax.plot(
                fine,
                scale * limit_update(mu, r["sigma"], fine, eps),
                color=c,
                lw=1.6,
                label=label if ax is axes[0] else None,
            )
            ax.plot(powers, scale * r["sim"], "o", color=c, ms=3.5, mfc="none")
            ax.plot([r["p_cf"]], [scale * r["u_best"]], "*", color=c, ms=13, mec="k", mew=0.6)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("update magnitude u(p)  (log scale)")
    axes[0].set_title(
        f"AdamPower update vs p: g ~ Unif($\\mu\\pm\\sigma$), $\\mu$={mu:g}, $\\epsilon$={eps:g}"
    )
    axes[1].set_ylabel("u(p) / u(1)")
    axes[1].set_title("u(p) / u(1); lines: closed form, o: real optimizer, *: best p")
    for ax in axes:
        ax.set_xlabel("power p")
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="docs dir: writes figures/theory_toy.png, theory_toy.md"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps/coordinates (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kw = {"steps": 1000, "n": 256} if args.quick else {}
    run(args.out, seed=args.seed, **kw)


if __name__ == "__main__":
    main()
