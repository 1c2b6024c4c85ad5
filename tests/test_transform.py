"""phi_p against an independent reference: the plain formula evaluated in float64 (numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_gradpower.transform import power_, sign_power, validate_power

POWERS = [0.8, 1.2, 1.5]
# fp32 bound, in units of eps = 2^-23 relative (~1e-6): torch's own vectorised pow reaches ~6.
FP32_BOUND = 8
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-20, 3e-8, -4e-4, 0.5, -1.0, 1.0, 7.0, -1e4, 1e20, -1e30]


def reference(x: torch.Tensor, p: float) -> np.ndarray:
    """sign(x) * |x|^p in float64, from the values x actually holds."""
    v = x.double().numpy()
    return np.sign(v) * np.abs(v) ** p


def ulp_error(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> float:
    """Largest error in units of the last place of ``dtype`` at the reference value.

    Beyond the dtype's range the only right answer is a signed infinity; below the normal range
    the unit is the subnormal spacing.
    """
    info = torch.finfo(dtype)
    g = got.double().numpy()
    overflow = np.abs(want) > info.max
    if not np.array_equal(g[overflow], np.sign(want[overflow]) * np.inf):
        return math.inf
    g, want = g[~overflow], want[~overflow]
    scale = np.maximum(np.abs(want), info.smallest_normal) * info.eps
    return float(np.max(np.abs(g - want) / scale, initial=0.0))


@pytest.mark.parametrize("p", POWERS)
def test_fp32_matches_formula_over_special_values(p):
    x = torch.tensor(SPECIAL, dtype=torch.float32)
    want = reference(x, p)
    got = sign_power(x, p)
    assert ulp_error(got, want, torch.float32) <= FP32_BOUND
    assert torch.equal(got == 0, x == 0)  # zeros stay zeros
    assert torch.equal(torch.sign(got), torch.sign(x))


@pytest.mark.parametrize("p", POWERS)
def test_fp32_random_gradient_scale(p):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    assert ulp_error(sign_power(x, p), reference(x, p), torch.float32) <= FP32_BOUND


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", POWERS)
def test_low_precision_is_computed_in_fp32_and_rounded_once(dtype, p):
    info = torch.finfo(dtype)
    x = torch.cat([
        torch.tensor([0.0, -0.0, 1e-4, -3e-3, 0.5, -2.0, 100.0], dtype=dtype),
        (torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e-2).to(dtype),
    ])
    want = reference(x, p)
    got = sign_power(x, p)
    assert got.dtype == dtype
    # correctly rounded result is within half an ulp; allow one ulp (fp32 math then one rounding)
    finite = np.abs(want) >= info.smallest_normal
    assert ulp_error(got[torch.from_numpy(finite)], want[finite], dtype) <= 1.0
    # bf16 keeps fp32's exponent range: |1e-30|^1.2 = 1e-36 must not flush to zero
    if dtype == torch.bfloat16:
        assert sign_power(torch.tensor([1e-30], dtype=dtype), 1.2).item() == pytest.approx(1e-36, rel=1e-2)


def test_naive_bf16_computation_would_fail_the_same_check():
    """The bound above is tight enough to catch computing the power in bf16 itself."""
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e-2).to(torch.bfloat16)
    naive = torch.sign(x) * x.abs().pow(1.2)
    assert ulp_error(naive, reference(x, 1.2), torch.bfloat16) > 1.0


def test_power_inplace_skips_none_and_handles_noncontiguous():
    a = torch.randn(8, 6)
    b = torch.randn(6, 8).t()  # non-contiguous
    want_a, want_b = reference(a, 1.2), reference(b, 1.2)
    power_([a, None, b], 1.2)
    assert ulp_error(a, want_a, torch.float32) <= FP32_BOUND
    assert ulp_error(b, want_b, torch.float32) <= FP32_BOUND


def test_p_equal_one_leaves_memory_untouched():
    g = torch.randn(100)
    version = g._version
    power_([g], 1.0)
    assert g._version == version


def test_grad_scale_gives_scaled_transform_of_true_gradient():
    g = torch.randn(1000) * 1e-3
    s = torch.tensor(1024.0)
    scaled = g * s
    power_([scaled], 1.2, grad_scale=s)
    np.testing.assert_allclose((scaled / s).numpy(), reference(g, 1.2), rtol=1e-5)
    naive = reference(g * s, 1.2) / s.item()  # transforming the scaled gradient: off by s^(p-1) = 4
    assert not np.allclose(naive, reference(g, 1.2), rtol=1e-2)


@pytest.mark.parametrize("bad", [0, -1.2, float("nan"), float("inf"), "1.2", None, True])
def test_bad_power_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match="gradpower p"):
        validate_power(bad)
    with pytest.raises(ValueError, match="gradpower p"):
        power_([torch.ones(2)], bad)


def test_sparse_gradient_is_rejected():
    g = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))
    with pytest.raises(ValueError, match="sparse"):
        power_([g], 1.2)


def test_dtensor_gradient_is_transformed_elementwise(cpu_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.randn(16, 4) * 1e-2
    dt = distribute_tensor(full.clone(), cpu_mesh, [Shard(0)])
    power_([dt], 1.2)
    assert type(dt).__name__ == "DTensor"
    assert ulp_error(dt.full_tensor(), reference(full, 1.2), torch.float32) <= FP32_BOUND


def test_reference_helpers_are_sane():
    assert ulp_error(torch.tensor([1.0]), np.array([1.0 + 8 * 2**-23]), torch.float32) == pytest.approx(8)
    assert math.isclose(reference(torch.tensor([-8.0]), 1 / 3)[0], -2.0)
