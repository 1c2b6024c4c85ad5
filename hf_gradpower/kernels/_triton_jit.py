"""Triton kernels for GradPower on accelerators: phi, AdamW on phi(g), Muon momentum on phi(g).

Only ``@triton.jit`` code lives here (imported lazily by :mod:`hf_gradpower.kernels.triton`, which launches them).
Every kernel reads each element once and writes it once, in any storage dtype (fp32/bf16/fp16), with the
math in fp32 registers.

Multi-tensor launches: the phi and AdamW kernels take a table of tensor addresses (int64 ``data_ptr``s)
and a block map (``block_tensor[b]``: 4 bytes per block; ``first_block[t]``, ``numel[t]`` per tensor), so a
whole list of tensors is one launch; a program loads its tensor's address and casts it to a typed pointer.
Offsets are int64 everywhere (a tensor may have 2**31 elements or more).

phi in fp32: ``phi(g) = g * 2**(q * log2|g|)`` with ``q = p - 1`` (the q-form: the error of ``log2`` is
scaled by ``q``, not ``p``), ``log2|g| = e + log2 m`` from the float's bits (m in [sqrt(1/2), sqrt(2))),
``q * e`` exact through a 12-bit head of q, and the integer part of the exponent applied as exact powers of
two, so ``exp2`` only sees a fraction (the scheme of the CPU C kernel). ``log2 m`` and ``2**f`` are the C
kernel's polynomials evaluated with explicit FMAs, not ``tl.log2`` / ``tl.exp2`` (on a GPU those compile to
approximate instructions whose error the interpreter does not show): every operation of phi is a correctly
rounded fp32 operation, so the interpreter computes what a GPU computes, and the ulp bound measured here
(``tests/test_accel.py``) is not tied to a libm. A subnormal ``|g|`` is scaled by 2**24 first and taken
in the p-form ``2**(p * log2|g|)`` (no ``0 * inf``); ``+-0``, ``+-inf`` are returned unchanged, NaN stays
NaN. A loss scale ``s`` the gradient still carries enters the exponent:
``s * phi(g / s) = |g| * 2**(q * log2(|g| / s))``, exactly for a power-of-two s (GradScaler's).
"""

from __future__ import annotations

import triton
import triton.language as tl

SUBNORMAL = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32
TWO24 = tl.constexpr(16777216.0)
SQRT_HALF_BITS = tl.constexpr(0x3F3504F3)  # sqrt(1/2) as float32 bits
# log2(1 + t), t in [sqrt(1/2) - 1, sqrt(2) - 1): gradpower_kernel.c's GP_L1..GP_L9, abs. error 4e-9
L1 = tl.constexpr(1.4426948569633933)
L2 = tl.constexpr(-0.7213473797342324)
L3 = tl.constexpr(0.4809233950618538)
L4 = tl.constexpr(-0.3607061473839342)
L5 = tl.constexpr(0.2876271062024314)
L6 = tl.constexpr(-0.2387847038669843)
L7 = tl.constexpr(0.21787121693052805)
L8 = tl.constexpr(-0.20885216242562984)
L9 = tl.constexpr(0.1225040321092694)
# 2**f - 1 = f (X1 + X2 f + ... + X6 f**5), |f| <= 1/2 + 2**-16: gradpower_kernel.c's gp_x, rel. error 3.0e-9
X1 = tl.constexpr(0.6931471824645996)
X2 = tl.constexpr(0.24022647738456726)
X3 = tl.constexpr(0.05550359934568405)
X4 = tl.constexpr(0.009618505835533142)
X5 = tl.constexpr(0.0013390807434916496)
X6 = tl.constexpr(0.0001532645255792886)


@triton.jit
def _log2_parts(a):
    """``a = 2**e * m``, m in [sqrt(1/2), sqrt(2)), for finite a > 0: (e, m, log2 m) in fp32, log2 m by a
    polynomial in FMAs; subnormals scaled by 2**24 first."""
    small = a < SUBNORMAL
    ab = (a * tl.where(small, TWO24, 1.0)).to(tl.int32, bitcast=True) - SQRT_HALF_BITS
    e = (ab >> 23) - tl.where(small, 24, 0)  # arithmetic shift: floor
    m = ((ab & 0x7FFFFF) + SQRT_HALF_BITS).to(tl.float32, bitcast=True)
    t = m - 1.0  # exact
    poly = tl.fma(tl.fma(tl.fma(tl.fma(L9, t, L8), t, L7), t, L6), t, L5)
    poly = tl.fma(tl.fma(tl.fma(tl.fma(poly, t, L4), t, L3), t, L2), t, L1)
    return e.to(tl.float32), m, poly * t


@triton.jit
def _exp2_fraction(f):
    """``2**f`` for |f| <= 1/2 (a polynomial in FMAs, 3e-9 relative error before rounding)."""
    poly = tl.fma(tl.fma(tl.fma(tl.fma(tl.fma(X6, f, X5), f, X4), f, X3), f, X2), f, X1)
    return tl.fma(poly, f, 1.0)


@triton.jit
def _times_exp2_int(x, k):
    """``x * 2**k`` for integer-valued k, as two exact power-of-two factors (k clamped to [-252, 254])."""
    k = tl.minimum(tl.maximum(k, -252.0), 254.0).to(tl.int32)
    k1 = k >> 1
    k2 = k - k1
    return x * ((k1 + 127) << 23).to(tl.float32, bitcast=True) * ((k2 + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _phi(g, qh, ql, ph, pl, scale_m, scale_e, scale_lm):
    """``s * phi_p(g / s)`` in fp32; (qh, ql) and (ph, pl) split q = p - 1 and p (qh, ph: 12 significant bits);
    ``s = scale_m * 2**scale_e``, ``scale_lm = log2 scale_m`` (see :func:`_scale_parts`).

    Normal |g| = m 2**e: ``|g| * 2**(q * y)``, subnormal |g|: ``s * 2**(p * y)``, ``y = log2(|g| / s)``; the
    integer part k of the exponent is split off exactly, so only a fraction in about [-0.5, 0.5] meets the
    polynomial, and ``m * 2**frac`` (in [0.5, 2]) is scaled by ``2**(e + k)`` last: no intermediate overflow.
    """
    a = tl.abs(g)
    small = a < SUBNORMAL
    e, m, lm = _log2_parts(a)
    y_e = e - scale_e
    hi = tl.where(small, ph, qh)
    lo = tl.where(small, pl, ql)
    t = (hi + lo) * (lm - scale_lm)
    y_hi = hi * y_e  # exact: 12-bit constant times an integer below 2**9
    k = tl.floor(y_hi + t + 0.5)
    frac = (y_hi - k) + tl.fma(lo, y_e, t)  # y_hi - k exact; |frac| <= ~0.5
    base = tl.where(small, scale_m, m) * _exp2_fraction(frac)
    mag = _times_exp2_int(base, tl.where(small, scale_e, e) + k)
    signed = tl.where(g < 0, -mag, mag)
    return tl.where((a == 0) | (a == float("inf")) | (g != g), g, signed)  # +-0, +-inf, nan unchanged


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (its two branches, each one FMA as in torch's vectorised CPU kernel)."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(-diff, 1.0 - weight, end))


@triton.jit
def _block(numel_ptr, block_tensor_ptr, first_block_ptr, BLOCK: tl.constexpr):
    """This program's tensor index, int64 element offsets, and whether the block lies wholly inside the tensor."""
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of((pid - tl.load(first_block_ptr + tid)) * BLOCK, BLOCK)
    numel = tl.load(numel_ptr + tid)
    return tid, start + tl.arange(0, BLOCK), start + BLOCK <= numel, numel


@triton.jit
def _typed(addr_ptr, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``tid``'s data pointer from the address table (16-byte aligned when the host checked it)."""
    ptr = tl.load(addr_ptr + tid).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _phi_body(g_ptr, offsets, mask, qh, ql, ph, pl, scale_m, scale_e, scale_lm, coef, HAS_COEF: tl.constexpr):
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    h = _phi(g, qh, ql, ph, pl, scale_m, scale_e, scale_lm).to(g_ptr.dtype.element_ty)
    if HAS_COEF:  # phi rounded to the storage dtype, then the float32 product rounded: clipping a stored phi
        h = (h.to(tl.float32) * coef).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + offsets, h, mask=mask)


@triton.jit
def _scale_parts(scale_ptr, HAS_SCALE: tl.constexpr):
    """The loss scale s = m 2**e as (m, e, log2 m); (1, 0, 0) without one. A power-of-two s (GradScaler's) has
    m = 1, log2 m = 0, so it is folded into the exponent exactly."""
    scale_m = 1.0
    scale_e = 0.0
    scale_lm = 0.0
    if HAS_SCALE:
        scale_e, scale_m, scale_lm = _log2_parts(tl.load(scale_ptr).to(tl.float32))
    return scale_m, scale_e, scale_lm


@triton.jit
def phi_kernel(
    addr_ptr, numel_ptr, block_tensor_ptr, first_block_ptr, scale_ptr, coef_ptr, qh, ql, ph, pl,
    HAS_SCALE: tl.constexpr, HAS_COEF: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """In place ``g <- coef * s * phi_p(g / s)`` over a table of same-dtype tensors (one read, one write).

    Whole blocks run unmasked, so the compiler can vectorise their loads and stores; a tensor's last
    partial block runs masked.
    """
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, first_block_ptr, BLOCK)
    g_ptr = _typed(addr_ptr, tid, DTYPE, ALIGNED)
    scale_m, scale_e, scale_lm = _scale_parts(scale_ptr, HAS_SCALE)
    coef = 1.0
    if HAS_COEF:
        coef = tl.load(coef_ptr).to(tl.float32)
    if whole:
        _phi_body(g_ptr, offsets, None, qh, ql, ph, pl, scale_m, scale_e, scale_lm, coef, HAS_COEF)
    else:
        _phi_body(g_ptr, offsets, offsets < numel, qh, ql, ph, pl, scale_m, scale_e, scale_lm, coef, HAS_COEF)


@triton.jit
def phi_sum_sq_kernel(
    addr_ptr, numel_ptr, block_tensor_ptr, first_block_ptr, scale_ptr, partial_ptr, qh, ql, ph, pl,
    HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """``partial[b] = sum over block b of (s * phi_p(g / s))**2`` (fp32; the gradients are only read)."""
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, first_block_ptr, BLOCK)
    g_ptr = _typed(addr_ptr, tid, DTYPE, ALIGNED)
    scale_m, scale_e, scale_lm = _scale_parts(scale_ptr, HAS_SCALE)
    g = tl.load(g_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    h = _phi(g, qh, ql, ph, pl, scale_m, scale_e, scale_lm)
    tl.store(partial_ptr + tl.program_id(0), tl.reduce(h * h, 0, _add))


@triton.jit
def _add(a, b):
    """The combine function of a sum (tl.sum's own is defined when triton is imported, so a test process that
    imported triton before setting TRITON_INTERPRET could not interpret it)."""
    return a + b


@triton.jit
def _adamw_body(
    param_ptr, grad_ptr, m_ptr, v_ptr, offsets, mask, step_size, bias_correction2_sqrt, coef, qh, ql, ph, pl, decay,
    one_minus_beta1, beta2, one_minus_beta2, eps, APPLY_PHI: tl.constexpr, HAS_COEF: tl.constexpr,
):
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if APPLY_PHI:
        g = _phi(g, qh, ql, ph, pl, 1.0, 0.0, 0.0)
    if HAS_COEF:
        g = g * coef
    x = tl.load(param_ptr + offsets, mask=mask).to(tl.float32) * decay
    m = _lerp(tl.load(m_ptr + offsets, mask=mask).to(tl.float32), g, one_minus_beta1)
    v = tl.fma(tl.load(v_ptr + offsets, mask=mask).to(tl.float32), beta2, one_minus_beta2 * (g * g))
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps  # correctly rounded, as torch's
    x = tl.fma(-step_size, tl.div_rn(m, denom), x)
    tl.store(param_ptr + offsets, x.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adamw_power_kernel(
    param_addr_ptr, grad_addr_ptr, exp_avg_addr_ptr, exp_avg_sq_addr_ptr, numel_ptr, block_tensor_ptr,
    first_block_ptr, step_hyper_ptr, coef_ptr, qh, ql, ph, pl, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
    APPLY_PHI: tl.constexpr,
    HAS_COEF: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One AdamW step on phi_p(g), torch's formulas; state in the parameter's dtype (whole blocks unmasked).

    ``step_hyper[t] = (lr / bias_correction1, sqrt(bias_correction2))`` of tensor ``t``; ``decay = 1 - lr * wd``;
    ``coef`` (a clipping factor, when HAS_COEF) multiplies phi(g). Every scalar argument arrives as float32 on
    a GPU, so ``1 - beta1``, ``1 - beta2`` and ``decay`` are derived in double by the caller, never here.
    """
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, first_block_ptr, BLOCK)
    param_ptr = _typed(param_addr_ptr, tid, PARAM_DTYPE, ALIGNED)
    grad_ptr = _typed(grad_addr_ptr, tid, GRAD_DTYPE, ALIGNED)
    m_ptr = _typed(exp_avg_addr_ptr, tid, PARAM_DTYPE, ALIGNED)
    v_ptr = _typed(exp_avg_sq_addr_ptr, tid, PARAM_DTYPE, ALIGNED)
    step_size = tl.load(step_hyper_ptr + 2 * tid)
    bias_correction2_sqrt = tl.load(step_hyper_ptr + 2 * tid + 1)
    coef = 1.0
    if HAS_COEF:
        coef = tl.load(coef_ptr).to(tl.float32)
    if whole:
        _adamw_body(param_ptr, grad_ptr, m_ptr, v_ptr, offsets, None, step_size, bias_correction2_sqrt, coef, qh, ql,
                    ph, pl, decay, one_minus_beta1, beta2, one_minus_beta2, eps, APPLY_PHI, HAS_COEF)
    else:
        _adamw_body(param_ptr, grad_ptr, m_ptr, v_ptr, offsets, offsets < numel, step_size, bias_correction2_sqrt,
                    coef, qh, ql, ph, pl, decay, one_minus_beta1, beta2, one_minus_beta2, eps, APPLY_PHI, HAS_COEF)


@triton.jit
def muon_power_momentum_kernel(
    grad_ptr, buf_ptr, update_ptr, coef_ptr, numel, momentum, one_minus_momentum, qh, ql, ph, pl,
    APPLY_PHI: tl.constexpr, HAS_COEF: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
):
    """Muon's momentum on h = coef * phi_p(g): ``buf <- lerp(buf, h, 1 - mu)``; Nesterov ``update = lerp(h, buf, mu)``.

    Reads g and buf once, writes buf (and the Nesterov update) once; every tensor in its own dtype.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors of 2**31 elements
    mask = offsets < numel
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if APPLY_PHI:
        g = _phi(g, qh, ql, ph, pl, 1.0, 0.0, 0.0)
    if HAS_COEF:
        g = g * tl.load(coef_ptr).to(tl.float32)
    buf = _lerp(tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(tl.float32), g, one_minus_momentum)
    buf = buf.to(buf_ptr.dtype.element_ty)
    tl.store(buf_ptr + offsets, buf, mask=mask)
    if NESTEROV:  # from the stored (rounded) buffer, as torch's grad.lerp(buf, mu) does
        buf = buf.to(tl.float32)
        tl.store(update_ptr + offsets, _lerp(g, buf, momentum).to(update_ptr.dtype.element_ty), mask=mask)
