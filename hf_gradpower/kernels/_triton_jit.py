"""Triton kernels for GradPower on accelerators: phi, AdamW on phi(g), Muon momentum on phi(g).

Only ``@triton.jit`` code lives here (imported lazily by :mod:`hf_gradpower.kernels.triton`, which launches them).
Every kernel reads each element once and writes it once, in any storage dtype (fp32/bf16/fp16), with the
math in fp32 registers.

Multi-tensor launches: the phi and AdamW kernels take a table of tensor addresses (int64 ``data_ptr``s)
and a block map (``block_tensor[b]``, ``block_start[b]``), so a whole list of tensors is one launch; a
program loads its tensor's address and casts it to a typed pointer.

phi in fp32: ``phi(g) = g * 2**(q * log2|g|)`` with ``q = p - 1`` (the q-form: the error of ``log2`` is
scaled by ``q``, not ``p``), ``log2|g| = e + log2 m`` from the float's bits, ``q * e`` exact through a
12-bit head of q, and the integer part of the exponent applied as exact powers of two, so ``exp2`` only
sees a fraction (the scheme of the CPU C kernel). A subnormal ``|g|`` is scaled by 2**24 first and taken
in the p-form ``2**(p * log2|g|)`` (no ``0 * inf``); ``+-0``, ``+-inf`` are returned unchanged, NaN stays
NaN. A loss scale ``s`` the gradient still carries enters the exponent:
``s * phi(g / s) = |g| * 2**(q * log2(|g| / s))``, exactly for a power-of-two s (GradScaler's).
"""

from __future__ import annotations

import triton
import triton.language as tl

SUBNORMAL = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32
TWO24 = tl.constexpr(16777216.0)


@triton.jit
def _log2_parts(a):
    """``a = 2**e * m``, m in [1, 2), for finite a > 0: (e, log2 m) in fp32; subnormals scaled by 2**24 first."""
    small = a < SUBNORMAL
    bits = tl.where(small, a * TWO24, a).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(small, 24, 0)
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    return e.to(tl.float32), tl.log2(m)


@triton.jit
def _times_exp2_int(x, k):
    """``x * 2**k`` for integer-valued k, as two exact power-of-two factors (k clamped to [-252, 254])."""
    k = tl.minimum(tl.maximum(k, -252.0), 254.0).to(tl.int32)
    k1 = k >> 1
    k2 = k - k1
    return x * ((k1 + 127) << 23).to(tl.float32, bitcast=True) * ((k2 + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _phi(g, qh, ql, ph, pl, scale, scale_e, scale_lm):
    """``s * phi_p(g / s)`` in fp32; (qh, ql) and (ph, pl) split q = p - 1 and p (qh, ph: 12 significant bits).

    Normal |g|: ``|g| * 2**(q * y)``, subnormal |g|: ``s * 2**(p * y)``, ``y = log2(|g| / s) = e + log2 m``
    with the integer part of the exponent split off exactly, so only a fraction in about [-0.5, 0.5] meets ``exp2``.
    """
    a = tl.abs(g)
    small = a < SUBNORMAL
    e, lm = _log2_parts(a)
    e = e - scale_e
    hi = tl.where(small, ph, qh)
    lo = tl.where(small, pl, ql)
    t = (hi + lo) * (lm - scale_lm)
    y_hi = hi * e  # exact: 12-bit constant times an integer below 2**9
    k = tl.floor(y_hi + t + 0.5)
    frac = (y_hi - k) + (t + lo * e)  # y_hi - k exact; |frac| <= ~0.5
    mag = _times_exp2_int(tl.where(small, scale, a) * tl.exp2(frac), k)
    signed = tl.where(g < 0, -mag, mag)
    return tl.where((a == 0) | (a == float("inf")), g, signed)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (the two branches torch uses, so results match it op for op)."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _block(numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets, and whether the block lies wholly inside the tensor."""
    pid = tl.program_id(0)
    tid = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
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
def _phi_body(g_ptr, offsets, mask, qh, ql, ph, pl, scale, scale_e, scale_lm):
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(g_ptr + offsets, _phi(g, qh, ql, ph, pl, scale, scale_e, scale_lm).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_parts(scale_ptr, HAS_SCALE: tl.constexpr):
    """The loss scale s and (e, log2 m) of it; (1, 0, 0) without one. A power-of-two s (GradScaler's) has
    log2 m = 0, so it is folded into the exponent exactly."""
    scale = 1.0
    scale_e = 0.0
    scale_lm = 0.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
        scale_e, scale_lm = _log2_parts(scale)
    return scale, scale_e, scale_lm


@triton.jit
def phi_kernel(
    addr_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, scale_ptr, qh, ql, ph, pl,
    HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place ``g <- s * phi_p(g / s)`` over a table of same-dtype tensors (one read, one write).

    Whole blocks run unmasked, so the compiler can vectorise their loads and stores; a tensor's last
    partial block runs masked.
    """
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK)
    g_ptr = _typed(addr_ptr, tid, DTYPE, ALIGNED)
    scale, scale_e, scale_lm = _scale_parts(scale_ptr, HAS_SCALE)
    if whole:
        _phi_body(g_ptr, offsets, None, qh, ql, ph, pl, scale, scale_e, scale_lm)
    else:
        _phi_body(g_ptr, offsets, offsets < numel, qh, ql, ph, pl, scale, scale_e, scale_lm)


@triton.jit
def phi_sum_sq_kernel(
    addr_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, scale_ptr, partial_ptr, qh, ql, ph, pl,
    HAS_SCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """``partial[b] = sum over block b of (s * phi_p(g / s))**2`` (fp32; the gradients are only read)."""
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK)
    g_ptr = _typed(addr_ptr, tid, DTYPE, ALIGNED)
    scale, scale_e, scale_lm = _scale_parts(scale_ptr, HAS_SCALE)
    g = tl.load(g_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    h = _phi(g, qh, ql, ph, pl, scale, scale_e, scale_lm)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(h * h, axis=0))


@triton.jit
def _adamw_body(
    param_ptr, grad_ptr, m_ptr, v_ptr, offsets, mask, step_size, bias_correction2_sqrt, coef, qh, ql, ph, pl, decay,
    beta1, beta2, eps, APPLY_PHI: tl.constexpr, HAS_COEF: tl.constexpr,
):
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if APPLY_PHI:
        g = _phi(g, qh, ql, ph, pl, 1.0, 0.0, 0.0)
    if HAS_COEF:
        g = g * coef
    x = tl.load(param_ptr + offsets, mask=mask).to(tl.float32) * decay
    m = _lerp(tl.load(m_ptr + offsets, mask=mask).to(tl.float32), g, 1.0 - beta1)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32) * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    x = x - step_size * (m / denom)
    tl.store(param_ptr + offsets, x.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adamw_power_kernel(
    param_addr_ptr, grad_addr_ptr, exp_avg_addr_ptr, exp_avg_sq_addr_ptr, numel_ptr, block_tensor_ptr,
    block_start_ptr, step_hyper_ptr, coef_ptr, qh, ql, ph, pl, decay, beta1, beta2, eps, APPLY_PHI: tl.constexpr,
    HAS_COEF: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One AdamW step on phi_p(g), torch's formulas; state in the parameter's dtype (whole blocks unmasked).

    ``step_hyper[t] = (lr / bias_correction1, sqrt(bias_correction2))`` of tensor ``t``; ``decay = 1 - lr * wd``;
    ``coef`` (a clipping factor, when HAS_COEF) multiplies phi(g).
    """
    tid, offsets, whole, numel = _block(numel_ptr, block_tensor_ptr, block_start_ptr, BLOCK)
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
                    ph, pl, decay, beta1, beta2, eps, APPLY_PHI, HAS_COEF)
    else:
        _adamw_body(param_ptr, grad_ptr, m_ptr, v_ptr, offsets, offsets < numel, step_size, bias_correction2_sqrt,
                    coef, qh, ql, ph, pl, decay, beta1, beta2, eps, APPLY_PHI, HAS_COEF)


@triton.jit
def muon_power_momentum_kernel(
    grad_ptr, buf_ptr, update_ptr, coef_ptr, numel, momentum, qh, ql, ph, pl,
    APPLY_PHI: tl.constexpr, HAS_COEF: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
):
    """Muon's momentum on h = coef * phi_p(g): ``buf <- lerp(buf, h, 1 - mu)``; Nesterov ``update = lerp(h, buf, mu)``.

    Reads g and buf once, writes buf (and the Nesterov update) once; every tensor in its own dtype.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if APPLY_PHI:
        g = _phi(g, qh, ql, ph, pl, 1.0, 0.0, 0.0)
    if HAS_COEF:
        g = g * tl.load(coef_ptr).to(tl.float32)
    buf = _lerp(tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(tl.float32), g, 1.0 - momentum)
    buf = buf.to(buf_ptr.dtype.element_ty)
    tl.store(buf_ptr + offsets, buf, mask=mask)
    if NESTEROV:  # from the stored (rounded) buffer, as torch's grad.lerp(buf, mu) does
        buf = buf.to(tl.float32)
        tl.store(update_ptr + offsets, _lerp(g, buf, momentum).to(update_ptr.dtype.element_ty), mask=mask)
