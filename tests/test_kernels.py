import ctypes
import math
import os
import re
import subprocess

import pytest
import torch

from hf_gradpower.kernels import cpu as C
from hf_gradpower.kernels import dispatch, eager

PS = [0.5, 0.8, 0.9, 1.1, 1.2, 1.3, 1.5, 2.0]
ULP_BOUND = 4.0


def auto_(x, p):
    """phi of one tensor through the dispatcher (the C kernel where it passed its self-check, else eager)."""
    dispatch.phi_([x], p)


def fast_(x, p):
    """phi of one tensor by the C backend itself."""
    C.phi_([x], p)


def _paths():
    paths = [("eager", eager.sign_power_), ("auto", auto_)]
    if C.fast_kernel_available():
        paths.append(("fast", fast_))
    return paths


PATHS = _paths()
PATH_IDS = [name for name, _ in PATHS]


def _ulp_err(x, y, p):
    """Independent check: max |y - ref| / (2**-23 * max(|ref|, 2**-126)) over finite float32 references."""
    xd = x.double().reshape(-1)
    ref = xd.abs().pow(p) * torch.where(torch.signbit(xd), -1.0, 1.0)
    ref32 = ref.float().double()
    yd = y.double().reshape(-1)
    fin = torch.isfinite(ref32)
    assert torch.equal(torch.isnan(yd), torch.isnan(ref)), "nan mismatch"
    assert torch.equal(yd[~fin & ~torch.isnan(ref)], ref32[~fin & ~torch.isnan(ref)]), "overflow/inf mismatch"
    if not fin.any():
        return 0.0
    err = (yd[fin] - ref[fin]).abs() / (ref[fin].abs().clamp_min(2.0**-126) * 2.0**-23)
    return float(err.max())


def _special_values():
    return torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan])


def _value_sets():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(1, 0x7F800000, (50_000,), generator=g, dtype=torch.int32)
    loguniform = bits.view(torch.float32) * torch.where(torch.rand(50_000, generator=g) < 0.5, -1.0, 1.0)
    sub_bits = torch.randint(1, 0x00800000, (5_000,), generator=g, dtype=torch.int32)
    subnormal = torch.cat([sub_bits.view(torch.float32), -sub_bits.view(torch.float32)])
    subnormal = torch.cat([subnormal, torch.tensor([1e-45, -1e-45, 1.1754942e-38, 1e-40])])
    tiny30 = torch.logspace(-31, -29, 4_001, dtype=torch.float64).float()
    tiny37 = torch.logspace(-37.9, -36, 4_001, dtype=torch.float64).float()
    near1 = 1.0 + (torch.rand(20_000, generator=g, dtype=torch.float64) - 0.5) * 1e-3
    near1 = torch.cat([near1.float(), torch.tensor([1.0, -1.0, 1.0 - 2**-24, 1.0 + 2**-23, 0.99999994])])
    large = torch.logspace(29, 31, 4_001, dtype=torch.float64).float()
    huge = torch.logspace(36, 38.5, 4_001, dtype=torch.float64).float()
    gauss = torch.randn(50_000, generator=g) * 1e-3
    return {
        "loguniform": loguniform,
        "subnormal": subnormal,
        "tiny1e-30": torch.cat([tiny30, -tiny30]),
        "tiny1e-37": torch.cat([tiny37, -tiny37]),
        "near1": torch.cat([near1, -near1]),
        "large1e30": torch.cat([large, -large]),
        "huge": huge,
        "gauss": gauss,
    }


VALUE_SETS = _value_sets()


@pytest.mark.parametrize("name,fn", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("p", PS)
def test_accuracy_all_value_sets(name, fn, p):
    for set_name, x in VALUE_SETS.items():
        y = x.clone()
        fn(y, p)
        err = _ulp_err(x, y, p)
        assert err <= ULP_BOUND, f"{name} p={p} {set_name}: {err:.3f} ulp"


@pytest.mark.parametrize("name,fn", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("p", [0.5, 0.8, 1.2, 2.0, 3.0])
def test_special_values_exact(name, fn, p):
    x = _special_values()
    y = x.clone()
    fn(y, p)
    assert y[0] == 0 and not torch.signbit(y[0])
    assert y[1] == 0 and torch.signbit(y[1])
    assert y[2] == math.inf and y[3] == -math.inf
    assert torch.isnan(y[4]) and torch.isnan(y[5])


@pytest.mark.parametrize("name,fn", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("p", [0.8, 1.2])
def test_subnormal_inputs_absolute(name, fn, p):
    x = VALUE_SETS["subnormal"]
    y = x.clone()
    fn(y, p)
    ref = x.double().abs().pow(p) * torch.where(torch.signbit(x), -1.0, 1.0).double()
    # outputs that are themselves subnormal: within one subnormal step of the exact value
    small = ref.abs() < 2.0**-126
    assert small.any() == (p > 1)
    if small.any():
        assert float((y.double()[small] - ref[small]).abs().max()) <= 2.0**-149 * 1.01
    assert _ulp_err(x, y, p) <= ULP_BOUND


def test_error_metric_can_fail():
    x = VALUE_SETS["gauss"].clone()
    y = x.clone()
    eager.sign_power_(y, 1.2)
    assert _ulp_err(x, y, 1.2) <= 1.0
    y_bad = y * (1 + 5 * 2.0**-23)
    assert _ulp_err(x, y_bad, 1.2) > ULP_BOUND
    assert C.max_ulp_error(x, y_bad, 1.2) > ULP_BOUND
    assert C.max_ulp_error(x, y, 1.2) <= 1.0
    z = x.clone()
    eager.sign_power_(z, 1.3)  # wrong p: far off
    assert _ulp_err(x, z, 1.2) > 1e3


@pytest.mark.parametrize("name,fn", PATHS, ids=PATH_IDS)
def test_non_contiguous(name, fn):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(301, 257, generator=g) * 1e-3
    for view_fn in (lambda t: t.t(), lambda t: t[:, 1::3], lambda t: t[::2], lambda t: t.t()[5:100:7]):
        for p in (0.8, 1.2):
            x = base.clone()
            v = view_fn(x)
            assert not v.is_contiguous()
            orig = v.clone()
            untouched = x.clone()
            fn(v, p)
            assert _ulp_err(orig, v, p) <= ULP_BOUND
            # elements outside the view are untouched
            mask = torch.ones_like(x, dtype=torch.bool)
            view_fn(mask).fill_(False)
            assert torch.equal(x[mask], untouched[mask])


@pytest.mark.parametrize("name,fn", PATHS, ids=PATH_IDS)
def test_empty_and_shapes(name, fn):
    for shape in [(0,), (3, 0), (1,), (17,), (5, 7, 3), (70_001,)]:
        x = torch.randn(shape) * 1e-2
        orig = x.clone()
        fn(x, 1.2)
        assert x.shape == orig.shape
        if x.numel():
            assert _ulp_err(orig, x, 1.2) <= ULP_BOUND


def test_fast_matches_eager_large_multithreaded():
    if not C.fast_kernel_available():
        pytest.skip("fast kernel unavailable: " + C.kernel_info()["reason"])
    x = torch.randn(1_000_003) * 1e-3  # above the OpenMP threshold, odd tail
    for p in (0.8, 1.2):
        a = x.clone()
        b = x.clone()
        fast_(a, p)
        eager.sign_power_(b, p)
        assert (
            float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-38)).max()) < 4 * 2.0**-23
        )


def test_env_var_modes(monkeypatch):
    x = VALUE_SETS["gauss"][:1000].clone()
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    y = x.clone()
    auto_(y, 1.2)
    ref = x.clone()
    eager.sign_power_(ref, 1.2)
    assert torch.equal(y, ref)
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        auto_(x.clone(), 1.2)
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    y = x.clone()
    if C.fast_kernel_available():
        auto_(y, 1.2)
        assert _ulp_err(x, y, 1.2) <= ULP_BOUND
    else:
        with pytest.raises(RuntimeError):
            auto_(y, 1.2)


def test_other_dtypes_and_p_one():
    x = torch.randn(1000, dtype=torch.float64)
    y = x.clone()
    auto_(y, 1.2)
    assert torch.allclose(y, x.abs().pow(1.2) * x.sign(), rtol=1e-12, atol=0)
    z = torch.randn(100)
    w = z.clone()
    auto_(w, 1.0)
    assert torch.equal(w, z)


def test_kernel_info_and_validation_fallback(monkeypatch, caplog):
    info = C.kernel_info()
    assert {"available", "impl", "init_seconds", "reason", "mode"} <= set(info)
    if not C.fast_kernel_available():
        pytest.skip("fast kernel unavailable")
    good = C.fast_kernel()

    class Bad:  # a deliberately wrong kernel (p off by 1e-4) must be rejected by validation, with a warning
        impl = "bad"
        flags: list = []
        cached = False

        @staticmethod
        def sign_power_many(xs, p, nthreads):
            good.sign_power_many(xs, p * 1.0001, nthreads)

    ok, msg = C.validate(Bad(), eager.sign_power_)
    assert not ok, msg
    ok, msg = C.validate(good, eager.sign_power_)
    assert ok, msg

    saved = dict(C._state)
    monkeypatch.setattr(C, "build", lambda: Bad())
    C._state.update(initialised=False, kernel=None)
    try:
        with caplog.at_level("WARNING"):
            assert not C.fast_kernel_available()
        assert any("failed validation" in r.message for r in caplog.records)
        x = VALUE_SETS["gauss"][:1000].clone()
        y = x.clone()
        auto_(y, 1.2)  # auto -> eager fallback, still correct
        assert _ulp_err(x, y, 1.2) <= ULP_BOUND
    finally:
        C._state.clear()
        C._state.update(saved)


# ----------------------------------------------------------------------------------------------------------
# every variant this machine can build: AVX-512 (native here), AVX2+FMA, portable C
# ----------------------------------------------------------------------------------------------------------
def _variant(name):
    try:
        return C.load_variant(name)
    except RuntimeError as exc:
        pytest.skip(f"variant {name} not buildable here: {exc}")


VARIANT_NAMES = list(C.VARIANTS)
# p over the whole accepted range (0, 4] in steps of 0.05, plus values near 0, 1 and 4
SWEEP_PS = [round(0.05 * i, 2) for i in range(1, 81)] + [0.01, 0.999, 1.001, 3.9, 3.95, 3.99]


def _sweep_x():
    """Random normal-range bit patterns (all magnitudes), gradient-like values 1e-9..10, subnormals, and two
    hard cases for the AVX-512 table path at p = 3.9."""
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(0x00800000, 0x7F800000, (30_000,), generator=g, dtype=torch.int32).view(torch.float32)
    grads = torch.randn(30_000, generator=g) * 10.0 ** torch.empty(30_000).uniform_(-9, 1, generator=g)
    sub = torch.randint(1, 0x00800000, (2_000,), generator=g, dtype=torch.int32).view(torch.float32)
    return torch.cat([bits, -bits[:10_000], grads, sub, -sub, torch.tensor([-3.351092746e-04, 7.932249069])])


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_each_variant_meets_its_stated_ulp_bound_on_a_dense_sweep_of_p_and_x(name):
    """C.ULP_BOUNDS (per variant, stated in the README) bounds this sweep; they come from a denser one."""
    kernel = _variant(name)
    bound = C.ULP_BOUNDS[kernel.impl.removesuffix("-1thread")]
    x = _sweep_x()
    worst = (0.0, None)
    for p in SWEEP_PS:
        y = x.clone()
        kernel.sign_power_many([y], p, 2)
        worst = max(worst, (_ulp_err(x, y, p), p))
    assert worst[0] <= bound, f"{kernel.impl}: {worst[0]:.3f} ulp at p={worst[1]} > stated {bound}"
    assert worst[0] <= C.ULP_BOUND


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_multi_tensor_entry_equals_one_call_per_tensor(name):
    """One OpenMP region over a list (empty, tiny, chunk-boundary and odd sizes): the same bits as per tensor."""
    kernel = _variant(name)
    g = torch.Generator().manual_seed(5)
    sizes = [0, 1, 7, 16_384, 16_385, 100_003, 33, 65_536]
    xs = [torch.randn(n, generator=g) * 1e-3 for n in sizes]
    together = [x.clone() for x in xs]
    kernel.sign_power_many(together, 1.2, 2)
    for x, y in zip(xs, together, strict=True):
        alone = x.clone()
        kernel.sign_power_many([alone], 1.2, 1)
        assert torch.equal(y, alone)
        if x.numel():
            assert _ulp_err(x, y, 1.2) <= C.ULP_BOUND


@pytest.mark.parametrize("name", VARIANT_NAMES)
@pytest.mark.parametrize("coef", [1.0, 0.37])
@pytest.mark.parametrize("p", [1.2, 1.0], ids=["phi", "no-phi"])
def test_each_variant_adamw_on_phi_matches_the_float64_formula(name, coef, p):
    """One AdamW step on coef * phi_p(g) per tensor (coef: a clip coefficient; p = 1: on coef * g, the entry
    clipping uses once it wrote phi), each with its own step (hyper row), vs float64. The sizes cover chunk
    remainders and the edges of the software-pipelined loops (under 32 floats, 32, 47, 48, 63, 64, 95)."""
    kernel = _variant(name)
    g = torch.Generator().manual_seed(3)
    sizes = (100_003, 517, 1, 17, 32, 47, 48, 63, 64, 95)
    lr, wd, b1, b2, eps = 1e-3, 0.1, 0.9, 0.95, 1e-8
    grads = [torch.randn(n, generator=g) * 1e-3 for n in sizes]
    params = [torch.randn(n, generator=g) for n in sizes]
    ms = [torch.randn(n, generator=g) * 1e-4 for n in sizes]
    vs = [torch.rand(n, generator=g) * 1e-8 for n in sizes]
    steps = (1.0, 7.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0)
    hyper = []
    for step in steps:
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        hyper += [1 - lr * wd, b1, 1 - b1, b2, 1 - b2, lr / bc1, 1 / bc2**0.5, eps]
    outs = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    kernel.adamw_power_many(*outs[:1], grads, *outs[1:], p, (ctypes.c_float * len(hyper))(*hyper), 2, coef=coef)
    for i, step in enumerate(steps):
        gd = grads[i].double()
        phi = gd.abs().pow(p) * gd.sign() * C._f32(coef)
        m = b1 * ms[i].double() + (1 - b1) * phi
        v = b2 * vs[i].double() + (1 - b2) * phi * phi
        upd = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        ref = params[i].double() * (1 - lr * wd) - lr * upd
        # float32 sums: within 2 ulp of the largest term (the terms cancel where m crosses zero)
        for got, want, terms in ((outs[1][i], m, ms[i]), (outs[2][i], v, vs[i])):
            atol = 2 * 2.0**-23 * float(terms.abs().max() + want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=atol)
        # |update| <= ~lr * 1/(1-b1^t); float32 rounding of theta and of m/den: within 1e-6 absolute
        torch.testing.assert_close(outs[0][i].double(), ref, rtol=0, atol=1e-6)
        assert torch.equal(grads[i], grads[i].clone())  # the gradient is only read


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_each_variant_adamw_update_matches_float64_over_all_magnitudes_of_v(name):
    """The update m / (sqrt(v) ibc2 + eps) alone (g = 0, beta = 1, decay 1, step 1, theta = 0: theta' = -update)
    against float64 for v over every decade of float32 (0, subnormals, 1e30, FLT_MAX), with tiny and usual eps:
    within 2^-21 relative (sqrt, fma, divide: 3 roundings, 2^-23.4; an approximate rsqrt/rcp without its Newton
    step is off by 2^-14..2^-12). Edges as IEEE sqrt and divide: v = 0 gives m / eps, v = inf gives 0,
    nan stays nan, and eps = 0 with v = 0 gives +-inf (nan for m = 0)."""
    kernel = _variant(name)
    g = torch.Generator().manual_seed(11)
    n = 40_000
    bits = torch.randint(1, 0x7F800000, (n,), generator=g, dtype=torch.int32).view(torch.float32)  # 0 < v < inf
    special = torch.tensor([0.0, 1.4e-45, 1e-40, 1.17549435e-38, 1e-20, 1.0, 1e30, 3.4028235e38])
    v = torch.cat([bits, special.repeat(8)])
    ibc2 = 1.0 / math.sqrt(1 - 0.999**3)
    for eps in (1e-8, 1e-30):
        ibc2_32, eps_32 = C._f32(ibc2), C._f32(eps)
        den = v.double().sqrt() * ibc2_32 + eps_32
        # m sized so that |update| lies in [1e-3, 1e3] (normal float32), either sign
        scale = torch.randn(v.numel(), generator=g).double() * 10.0 ** torch.empty(v.numel()).uniform_(-3, 3, generator=g)
        m = (den * scale).float()
        want = m.double() / den
        hyper = (ctypes.c_float * 8)(1.0, 1.0, 0.0, 1.0, 0.0, 1.0, ibc2, eps)
        theta, ms, vs = torch.zeros_like(v), m.clone(), v.clone()
        kernel.adamw_power_many([theta], [torch.zeros_like(v)], [ms], [vs], 1.2, hyper, 2)
        assert torch.equal(ms, m) and torch.equal(vs, v)
        rel = ((-theta.double() - want).abs() / want.abs()).max().item()
        assert rel <= 2.0**-21, f"{kernel.impl} eps={eps}: relative error {rel:.3g} = 2^{math.log2(rel):.2f}"
    m = torch.tensor([3e-3, -2e-9, 0.0, 1.0, -1.0, 0.0, 5.0, 7.0])
    v = torch.tensor([0.0, 0.0, float("inf"), float("inf"), 1e-12, float("nan"), 0.0, 0.0])
    eps = [1e-8] * 6 + [0.0, 0.0]
    want = [3e-3 / 1e-8, -2e-9 / 1e-8, 0.0, 0.0, -1.0 / (1e-6 * ibc2 + 1e-8), math.nan, math.inf, math.inf]
    for i in range(8):
        theta = torch.zeros(1)
        hyper = (ctypes.c_float * 8)(1.0, 1.0, 0.0, 1.0, 0.0, 1.0, ibc2, eps[i])
        kernel.adamw_power_many([theta], [torch.zeros(1)], [m[i : i + 1].clone()], [v[i : i + 1].clone()], 1.2, hyper, 1)
        got = -theta.item()
        if math.isnan(want[i]) or math.isinf(want[i]):
            assert (math.isnan(got) and math.isnan(want[i])) or got == want[i], (i, got, want[i])
        else:
            assert got == pytest.approx(want[i], rel=2e-6, abs=0), (i, got, want[i])


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_each_variant_sum_of_squares_of_phi_matches_float64(name):
    """The read-only norm entry: per-tensor sums of phi_p(x)^2 vs float64 over sizes at the chunk and loop edges
    and magnitudes 1e-9..10, within 2 * ULP_BOUNDS ulp (relative; the squares and sums are in double), the same
    bits for 1 and 2 threads, inputs untouched; inf gives inf, nan gives nan, an empty tensor 0."""
    kernel = _variant(name)
    bound = 2 * C.ULP_BOUNDS[kernel.impl.removesuffix("-1thread")] * 2.0**-23
    g = torch.Generator().manual_seed(13)
    sizes = (100_003, 16_384, 16_385, 517, 1, 17, 32, 47, 63, 0, 95)
    xs = [torch.randn(n, generator=g) * 10.0 ** torch.empty(n).uniform_(-9, 1, generator=g) for n in sizes]
    xs[1][::97] = 0.0
    xs[3][:4] = torch.tensor([1e-45, -1e-40, 2e-38, -3e4])  # subnormal inputs and a large one
    for p in (0.5, 0.8, 1.0, 1.2, 1.5, 2.5, 4.0):
        before = [x.clone() for x in xs]
        got = kernel.phi_sumsq_many(xs, p, 2)
        assert torch.equal(got, kernel.phi_sumsq_many(xs, p, 1)), "depends on the thread count"
        assert all(torch.equal(x, b) for x, b in zip(xs, before, strict=True)), "the gradients must be read only"
        want = torch.stack([(x.double().abs() ** (2 * p)).sum() for x in xs])
        rel = ((got - want).abs() / want.clamp_min(1e-300)).max().item()
        assert got[sizes.index(0)] == 0.0 and rel <= bound, f"{kernel.impl} p={p}: {rel:.3g} > {bound:.3g}"
    for special, want in ((float("inf"), math.inf), (float("nan"), math.nan)):
        x = torch.randn(1000, generator=g)
        x[511] = special
        got = kernel.phi_sumsq_many([x], 1.2, 2)[0].item()
        assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_each_variant_phi_with_a_clip_coefficient_is_phi_then_one_multiply(name):
    """coef * phi_p(x) in one call: bit for bit phi followed by a float32 multiply (what clipping a stored phi
    does), chunk remainders included; coef = 1 is phi itself."""
    kernel = _variant(name)
    g = torch.Generator().manual_seed(17)
    xs = [torch.randn(n, generator=g) * 1e-3 for n in (100_003, 16_385, 31, 1)]
    for coef in (0.37, 1.0, 3.0):
        scaled, plain = [x.clone() for x in xs], [x.clone() for x in xs]
        kernel.sign_power_many(scaled, 1.2, 2, coef=coef)
        kernel.sign_power_many(plain, 1.2, 2)
        assert all(torch.equal(a, b * coef) for a, b in zip(scaled, plain, strict=True))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_each_variant_sum_of_squares_that_writes_phi_equals_phi_then_the_read_only_sums(name):
    """The write-once norm pass: the tensors end up holding exactly what phi alone writes, and the sums are the
    read-only entry's bits, for 1 and 2 threads, at chunk and loop edges, with inf and nan inside."""
    kernel = _variant(name)
    g = torch.Generator().manual_seed(19)
    sizes = (100_003, 16_384, 16_385, 517, 1, 17, 32, 47, 63, 0, 95)
    xs = [torch.randn(n, generator=g) * 10.0 ** torch.empty(n).uniform_(-9, 1, generator=g) for n in sizes]
    xs[3][:3] = torch.tensor([float("inf"), float("nan"), 1e-45])
    for p in (0.8, 1.2, 2.5):
        for nthreads in (1, 2):
            written, phi = [x.clone() for x in xs], [x.clone() for x in xs]
            got = kernel.phi_sumsq_many(written, p, nthreads, write=True)
            kernel.sign_power_many(phi, p, nthreads)
            assert all(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
                       for a, b in zip(written, phi, strict=True))  # fmt: skip
            want = kernel.phi_sumsq_many(xs, p, nthreads)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and got[3].isnan()


def test_portable_loop_auto_vectorises_without_libm_calls():
    """gcc reports the three portable loops (phi, AdamW, sum of squares) vectorised (what NEON gets on ARM): no libm call blocks it."""
    cc = C._find_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = [*C._BASE_FLAGS, *C.VARIANTS["portable"], "-fopenmp", "-fopt-info-vec-optimized", "-o", os.devnull]
    res = subprocess.run([cc, *flags, str(C.SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or "vectorized" not in res.stderr:
        pytest.skip(f"compiler gives no vectorisation report: {res.stderr[-200:]}")
    lines = C.SOURCE.read_text().splitlines()
    loops = {i + 1 for i, line in enumerate(lines) if "for (int64_t i = 0; i < n; i++)" in line}
    reported = {int(m) for m in re.findall(r"gradpower_kernel.c:(\d+):\d+: optimized: loop vectorized", res.stderr)}
    assert len(loops) == 3 and all(reported & {line, line + 1} for line in loops), (loops, reported)  # gcc may
    # name the loop body's first line


def test_no_cpu_kernel_is_built_for_tensors_that_are_not_on_the_cpu():
    """meta tensors (standing in for an accelerator) through power_ and AdamPower's step: the kernel module
    stays uninitialised -- nothing was compiled or validated."""
    import hf_gradpower as gp
    from hf_gradpower.adampower import AdamPower

    saved = dict(C._state)
    C._state.clear()
    C._state.update(initialised=False, kernel=None, reason="not initialised")
    try:
        params = [torch.nn.Parameter(torch.empty(1000, 64, device="meta")) for _ in range(3)]
        for q in params:
            q.grad = torch.empty_like(q)
        gp.power_([q.grad for q in params], 1.2)
        assert all(dispatch.backend_for(q.grad) is eager for q in params)
        opt = AdamPower(params, lr=1e-3, p=1.2, foreach=True)
        opt.step()
        assert C._state["initialised"] is False and C._state["kernel"] is None
        # and the same calls on CPU tensors do initialise it (so the check above can fail)
        gp.power_([torch.randn(10)], 1.2)
        assert C._state["initialised"] is True
    finally:
        C._state.clear()
        C._state.update(saved)


def test_kernel_modules_import_nothing_from_the_layers_above():
    """One direction only: transform and the optimizers call the kernel layer, never the other way round."""
    import ast
    from pathlib import Path

    above = {"attach", "transform", "adampower", "muon", "muon_sharded", "optimizers", "adamw_step", "trainer"}
    folder = Path(C.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "hf_gradpower" and len(parts) > 1 and parts[1] in above), (path.name, name)
