import math

import pytest
import torch

from hf_gradpower import _kernels as K

PS = [0.5, 0.8, 0.9, 1.1, 1.2, 1.3, 1.5, 2.0]
ULP_BOUND = 4.0


def _paths():
    paths = [("eager", K.sign_power_eager_), ("auto", K.sign_power_)]
    if K.fast_kernel_available():
        paths.append(("fast", K.sign_power_fast_))
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
    K.sign_power_eager_(y, 1.2)
    assert _ulp_err(x, y, 1.2) <= 1.0
    y_bad = y * (1 + 5 * 2.0**-23)
    assert _ulp_err(x, y_bad, 1.2) > ULP_BOUND
    assert K.max_ulp_error(x, y_bad, 1.2) > ULP_BOUND
    assert K.max_ulp_error(x, y, 1.2) <= 1.0
    z = x.clone()
    K.sign_power_eager_(z, 1.3)  # wrong p: far off
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
    if not K.fast_kernel_available():
        pytest.skip("fast kernel unavailable: " + K.kernel_info()["reason"])
    x = torch.randn(1_000_003) * 1e-3  # above the OpenMP threshold, odd tail
    for p in (0.8, 1.2):
        a = x.clone()
        b = x.clone()
        K.sign_power_fast_(a, p)
        K.sign_power_eager_(b, p)
        assert (
            float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-38)).max()) < 4 * 2.0**-23
        )


def test_env_var_modes(monkeypatch):
    x = VALUE_SETS["gauss"][:1000].clone()
    monkeypatch.setenv(K.ENV_VAR, "eager")
    y = x.clone()
    K.sign_power_(y, 1.2)
    ref = x.clone()
    K.sign_power_eager_(ref, 1.2)
    assert torch.equal(y, ref)
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        K.sign_power_(x.clone(), 1.2)
    monkeypatch.setenv(K.ENV_VAR, "fast")
    y = x.clone()
    if K.fast_kernel_available():
        K.sign_power_(y, 1.2)
        assert _ulp_err(x, y, 1.2) <= ULP_BOUND
    else:
        with pytest.raises(RuntimeError):
            K.sign_power_(y, 1.2)


def test_other_dtypes_and_p_one():
    x = torch.randn(1000, dtype=torch.float64)
    y = x.clone()
    K.sign_power_(y, 1.2)
    assert torch.allclose(y, x.abs().pow(1.2) * x.sign(), rtol=1e-12, atol=0)
    z = torch.randn(100)
    w = z.clone()
    K.sign_power_(w, 1.0)
    assert torch.equal(w, z)


def test_kernel_info_and_validation_fallback(monkeypatch, caplog):
    info = K.kernel_info()
    assert {"available", "impl", "init_seconds", "reason", "mode"} <= set(info)
    if not K.fast_kernel_available():
        pytest.skip("fast kernel unavailable")

    # a deliberately wrong kernel must be rejected by validation, with a warning
    class Bad:
        impl = "bad"
        flags: list = []
        cached = False

        @staticmethod
        def sign_power(ptr, n, p, nthreads):
            K._state["kernel_good"].sign_power(ptr, n, p * 1.0001, nthreads)

    K._state["kernel_good"] = K._state["kernel"]
    try:
        ok, msg = K._validate(Bad())
        assert not ok, msg
        ok, msg = K._validate(K._state["kernel"])
        assert ok, msg
    finally:
        K._state.pop("kernel_good")

    saved = dict(K._state)
    monkeypatch.setattr(K, "_build", lambda: Bad())
    K._state.update(initialised=False, kernel=None)
    K._state["kernel_good"] = saved["kernel"]
    try:
        with caplog.at_level("WARNING"):
            assert not K.fast_kernel_available()
        assert any("failed validation" in r.message for r in caplog.records)
        x = VALUE_SETS["gauss"][:1000].clone()
        y = x.clone()
        K.sign_power_(y, 1.2)  # auto -> eager fallback, still correct
        assert _ulp_err(x, y, 1.2) <= ULP_BOUND
    finally:
        K._state.clear()
        K._state.update(saved)


def test_portable_c_path_is_validated_and_agrees_with_the_native_one():
    """The non-AVX-512 loop (built for x86-64-v3, or plain flags elsewhere): accuracy and the one-pass AdamW."""
    if not K.fast_kernel_available():
        pytest.skip("fast kernel unavailable")
    flags = ("-march=x86-64-v3", "-fopenmp") if K.platform.machine() in ("x86_64", "AMD64") else ("-fopenmp",)
    try:
        portable = K._build((flags,))
    except RuntimeError as exc:
        pytest.skip(f"cannot build the portable variant here: {exc}")
    assert portable.impl.startswith("c-autovec")
    ok, msg = K._validate(portable)
    assert ok, msg
    native = K.fast_kernel()
    g = torch.Generator().manual_seed(3)
    n = 100_003
    grad = torch.randn(n, generator=g) * 1e-3
    hyper = K.ctypes.c_float * 8
    h = hyper(1 - 1e-4, 0.9, 0.1, 0.95, 0.05, 1e-3 / 0.1, 1 / 0.05**0.5, 1e-8)
    outs = []
    for kernel in (portable, native):
        param, m, v = torch.ones(n), torch.full((n,), 1e-4), torch.full((n,), 1e-8)
        kernel.adamw_power(param.data_ptr(), grad.data_ptr(), m.data_ptr(), v.data_ptr(), n, 1.2, h, 2)
        outs.append((param, m, v))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * float(a.abs().max()))
    # and against the formula: m = 0.9 m + 0.1 phi(g)
    phi = grad.double().abs().pow(1.2) * grad.double().sign()
    torch.testing.assert_close(outs[0][1].double(), 0.9 * 1e-4 + 0.1 * phi, rtol=1e-6, atol=5e-11)
