"""Fast in-place GradPower transform ``x <- sign(x) * |x|**p``, and AdamW on phi_p(g) in one pass.

Two implementations of phi are provided:

* :func:`sign_power_eager_` -- plain, accurate torch ops (works on any device and for DTensor). It is the
  fallback and the reference the fast path is validated against.
* a fast CPU kernel for float32: a small C file (no torch headers, so it compiles in well under a second)
  built at first use with the system C compiler (``-O3 -march=native``, OpenMP sharing torch's libgomp),
  loaded with :mod:`ctypes` and cached on disk. The same library has ``gp_adamw_power``, one AdamW step on
  phi_p(g) that reads each gradient once (used by :class:`hf_gradpower.adampower.AdamPower`).

Algorithms. AVX-512 (``c-avx512``): ``|x|**p = 2**(p*e + p*log2 m)`` with ``|x| = m * 2**e`` from
``getexp``/``getmant``; ``log2 m`` from a 32-entry in-register table (``vpermi2ps``) plus a cubic; ``p*e``
exactly as ``ph*e + pl*e`` (``ph`` has 12 significant bits, so ``ph*e`` is exact in float32); the integer
part is split off before the fractional power of two (degree-6 polynomial) and ``scalef`` applies it in
one rounding (correct overflow to inf and underflow to subnormals). About 23 vector operations per 16
floats. Elsewhere (``c-autovec``): an auto-vectorised C loop in the q-form ``|x| * 2**(q*e + q*log2 m)``,
``q = p - 1``. Measured max error: below 1.8 ulp for 0 < p <= 4 (bound asserted: 4 ulp); larger ``p``
uses the eager path.

The fast kernel is only used after it reproduced a float64 reference (<= 4 ulp, special values exact) on a
probe tensor at first use; otherwise a warning is logged and the eager path is used.

Environment variable ``HF_GRADPOWER_KERNEL``: ``auto`` (default), ``eager`` (always the torch ops) or
``fast`` (use the C kernel for CPU float32 tensors and raise if it cannot be built / failed validation;
other devices and dtypes always use the eager path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["sign_power_", "sign_power_eager_", "sign_power_fast_", "fast_kernel_available", "kernel_info"]

ENV_VAR = "HF_GRADPOWER_KERNEL"
CACHE_ENV_VAR = "HF_GRADPOWER_CACHE"
# Range of p the fast kernel accepts; outside it the eager path is used (nothing in GradPower needs more).
FAST_P_MAX = 4.0
# Below this many elements the kernel runs single-threaded (OpenMP fork/join would cost more than it saves).
PARALLEL_MIN_NUMEL = 1 << 15

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* k[0..2] = (qh, ql, qf): q = p - 1 split so that qh * e is exact (portable q-form);
   k[3..5] = (ph, pl, pf): the same split of p (AVX-512 p-form). */

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define GP_IMPL 2
typedef struct { __m512 inv0, inv1, lg0, lg1, ph, pl, pf, one, l1, l2, l3, e[7]; __m512i sgn; } gp_consts;

static void gp_init(gp_consts *c, const float *k) {
  float tinv[32], tlog[32];
  for (int i = 0; i < 32; i++) {         /* centres of 32 mantissa cells; log2 of the rounded inverse */
    double ctr = 1.0 + (i + 0.5) / 32.0;
    tinv[i] = (float)(1.0 / ctr);
    tlog[i] = (float)(-log2((double)tinv[i]));
  }
  c->inv0 = _mm512_loadu_ps(tinv); c->inv1 = _mm512_loadu_ps(tinv + 16);
  c->lg0 = _mm512_loadu_ps(tlog); c->lg1 = _mm512_loadu_ps(tlog + 16);
  c->ph = _mm512_set1_ps(k[3]); c->pl = _mm512_set1_ps(k[4]); c->pf = _mm512_set1_ps(k[5]);
  c->one = _mm512_set1_ps(1.0f);
  /* log2(1+r), |r| <= 1/64: Taylor / ln 2 (truncation 6e-9) */
  c->l1 = _mm512_set1_ps(1.4426950408889634f); c->l2 = _mm512_set1_ps(-0.7213475204444817f);
  c->l3 = _mm512_set1_ps(0.48089834696298783f);
  /* 2^f on [-0.5, 0.5], least squares on Chebyshev nodes, rel. error 1.9e-9 */
  static const float ec[7] = {1.000000000592169f, 0.6931472056058905f, 0.24022646608042247f,
                              0.05550328985744751f, 0.009618519562708776f, 0.0013399865143695364f,
                              0.00015337580963355483f};
  for (int i = 0; i < 7; i++) c->e[i] = _mm512_set1_ps(ec[i]);
  c->sgn = _mm512_set1_epi32((int)0x80000000u);
}

/* phi_p on 16 lanes: |x|^p = 2^(p*e + p*log2 m), |x| = m 2^e; p*e = ph*e (exact) + pl*e. Zero, inf and
   nan lanes come back unchanged; the sign of x is copied onto |x|^p. */
static inline __m512 gp_phi16(__m512 v, const gp_consts *c) {
  __mmask16 ok = _mm512_fpclass_ps_mask(v, 0x9f) ^ (__mmask16)0xffff;
  __m512 e = _mm512_getexp_ps(v);                                       /* floor(log2|x|), subnormals ok */
  __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero); /* |x| / 2^e in [1, 2) */
  __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 18);           /* low 5 bits: mantissa top */
  __m512 r = _mm512_fmsub_ps(m, _mm512_permutex2var_ps(c->inv0, idx, c->inv1), c->one);
  __m512 L = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(c->l3, r, c->l2), r, c->l1), r,
                             _mm512_permutex2var_ps(c->lg0, idx, c->lg1));  /* log2 m */
  __m512 ph = _mm512_mul_ps(c->ph, e);                                   /* exact */
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(c->pf, L, ph), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmadd_ps(c->pf, L, _mm512_fmadd_ps(c->pl, e, _mm512_sub_ps(ph, n)));  /* ph - n exact */
  __m512 P = _mm512_fmadd_ps(c->e[6], f, c->e[5]);
  for (int i = 4; i >= 0; i--) P = _mm512_fmadd_ps(P, f, c->e[i]);
  __m512 res = _mm512_scalef_ps(P, n);                                   /* P * 2^n, one rounding */
  /* ok lanes: res | (x & sign); others keep x */
  return _mm512_castsi512_ps(_mm512_mask_ternarylogic_epi32(_mm512_castps_si512(v), ok,
                                                            _mm512_castps_si512(res), c->sgn, 0xEC));
}

static void kern(float *restrict x, int64_t n, const float *k) {
  gp_consts c;
  gp_init(&c, k);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gp_phi16(_mm512_loadu_ps(x + i), &c));
  if (i < n) {
    __mmask16 lm = (__mmask16)((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, lm, gp_phi16(_mm512_maskz_loadu_ps(lm, x + i), &c));
  }
}

/* AdamW on 16 lanes with g <- phi_p(g) in registers (the gradient in memory is left as it is). */
static inline void gp_adamw16(float *pp, const float *gp, float *mp, float *vp, __mmask16 lm, const gp_consts *c,
                              __m512 decay, __m512 b1, __m512 omb1, __m512 b2, __m512 omb2, __m512 step,
                              __m512 ibc2, __m512 eps) {
  __m512 g = gp_phi16(_mm512_maskz_loadu_ps(lm, gp), c);
  __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, pp), decay);
  __m512 m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lm, mp), b1, _mm512_mul_ps(g, omb1));
  __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lm, vp), b2, _mm512_mul_ps(_mm512_mul_ps(g, g), omb2));
  __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(v), ibc2, eps);
  p = _mm512_fnmadd_ps(step, _mm512_div_ps(m, den), p);
  _mm512_mask_storeu_ps(mp, lm, m);
  _mm512_mask_storeu_ps(vp, lm, v);
  _mm512_mask_storeu_ps(pp, lm, p);
}

static void kern_adamw(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                       int64_t n, const float *k, const float *h) {
  gp_consts c;
  gp_init(&c, k);
  const __m512 decay = _mm512_set1_ps(h[0]), b1 = _mm512_set1_ps(h[1]), omb1 = _mm512_set1_ps(h[2]),
               b2 = _mm512_set1_ps(h[3]), omb2 = _mm512_set1_ps(h[4]), step = _mm512_set1_ps(h[5]),
               ibc2 = _mm512_set1_ps(h[6]), eps = _mm512_set1_ps(h[7]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    gp_adamw16(pp + i, gp + i, mp + i, vp + i, (__mmask16)0xffff, &c, decay, b1, omb1, b2, omb2, step, ibc2, eps);
  if (i < n)
    gp_adamw16(pp + i, gp + i, mp + i, vp + i, (__mmask16)((1u << (n - i)) - 1u), &c, decay, b1, omb1, b2, omb2,
               step, ibc2, eps);
}
#else
#define GP_IMPL 1
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* round to nearest for |v| < 2^22 without SSE4.1 roundps; fmaf only where the hardware has FMA */
static inline float rnd(float v) { return (v + 12582912.0f) - 12582912.0f; }
#ifdef __FMA__
#define GP_FMA(a, b, c) fmaf(a, b, c)
#else
#define GP_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* phi_p of one float, q-form: |x|^p = |x| * 2^(q*e + q*log2 m) with m in [sqrt(.5), sqrt(2)). */
static inline float gp_phi1(float xi, float qh, float ql, float qf) {
  uint32_t b = f2u(xi);
  uint32_t a = b & 0x7fffffffu;
  int special = (a - 1u) >= 0x7f7fffffu;                /* zero, inf or nan: unchanged */
  int sub = a < 0x00800000u;
  float af = u2f(a) * (sub ? 16777216.0f : 1.0f);       /* normalise subnormals */
  int32_t ab = (int32_t)f2u(af) - 0x3f3504f3;
  int32_t e = (ab >> 23) - (sub ? 24 : 0);
  float m = u2f((uint32_t)(ab & 0x007fffff) + 0x3f3504f3u);
  float t = m - 1.0f;
  float L = t * (1.4426948569633933f + t * (-0.7213473797342324f + t * (0.4809233950618538f
            + t * (-0.3607061473839342f + t * (0.2876271062024314f + t * (-0.2387847038669843f
            + t * (0.21787121693052805f + t * (-0.20885216242562984f + t * 0.1225040321092694f))))))));
  float ef = (float)e;
  float ph = qh * ef;                                   /* exact */
  float n1 = rnd(ph);
  float f = GP_FMA(qf, L, (ph - n1) + ql * ef);
  float n2 = rnd(f);
  f = f - n2;
  float P = 0.9999999999595286f + f * (0.6931472067218104f + f * (0.24022651213786558f
            + f * (0.055503271903370205f + f * (0.009618025577416789f + f * (0.0013400441714101908f
            + f * 0.00015469740156558607f)))));
  float M = m * P;
  int32_t E = e + (int32_t)(n1 + n2);
  E = E < -252 ? -252 : (E > 254 ? 254 : E);
  int32_t E1 = E >> 1, E2 = E - E1;
  float r = (M * u2f((uint32_t)(E1 + 127) << 23)) * u2f((uint32_t)(E2 + 127) << 23);
  float res = u2f(f2u(r) | (b & 0x80000000u));
  return special ? xi : res;
}

static void kern(float *restrict x, int64_t n, const float *k) {
  const float qh = k[0], ql = k[1], qf = k[2];
#pragma omp simd
  for (int64_t i = 0; i < n; i++) x[i] = gp_phi1(x[i], qh, ql, qf);
}

static void kern_adamw(float *restrict pp, const float *restrict gp, float *restrict mp, float *restrict vp,
                       int64_t n, const float *k, const float *h) {
  const float qh = k[0], ql = k[1], qf = k[2];
  const float decay = h[0], b1 = h[1], omb1 = h[2], b2 = h[3], omb2 = h[4], step = h[5], ibc2 = h[6], eps = h[7];
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    float g = gp_phi1(gp[i], qh, ql, qf);
    float m = mp[i] * b1 + g * omb1, v = vp[i] * b2 + (g * g) * omb2;
    mp[i] = m;
    vp[i] = v;
    pp[i] = pp[i] * decay - step * (m / (sqrtf(v) * ibc2 + eps));
  }
}
#endif

int gp_impl(void) { return GP_IMPL; }

#define GP_CHUNK 16384
void gp_sign_power(float *x, int64_t n, const float *k, int nthreads) {
#ifdef _OPENMP
  if (nthreads > 1 && n > 2 * GP_CHUNK) {
    int64_t nch = (n + GP_CHUNK - 1) / GP_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nch; c++) {
      int64_t lo = c * GP_CHUNK, hi = lo + GP_CHUNK < n ? lo + GP_CHUNK : n;
      kern(x + lo, hi - lo, k);
    }
    return;
  }
#else
  (void)nthreads;
#endif
  kern(x, n, k);
}

/* One AdamW step (decoupled weight decay) on phi_p(grad), in a single pass over memory.
   h = (1 - lr*wd, beta1, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1, 1 / sqrt(bias_correction2), eps). */
void gp_adamw_power(float *param, const float *grad, float *exp_avg, float *exp_avg_sq, int64_t n,
                    const float *k, const float *h, int nthreads) {
#ifdef _OPENMP
  if (nthreads > 1 && n > 2 * GP_CHUNK) {
    int64_t nch = (n + GP_CHUNK - 1) / GP_CHUNK;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nch; c++) {
      int64_t lo = c * GP_CHUNK, hi = lo + GP_CHUNK < n ? lo + GP_CHUNK : n;
      kern_adamw(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, hi - lo, k, h);
    }
    return;
  }
#else
  (void)nthreads;
#endif
  kern_adamw(param, grad, exp_avg, exp_avg_sq, n, k, h);
}
"""

_IMPL_NAMES = {1: "c-autovec", 2: "c-avx512"}


# ----------------------------------------------------------------------------------------------------------
# eager (reference / fallback) path
# ----------------------------------------------------------------------------------------------------------
_EAGER_CHUNK = 1 << 22


def _eager_block_(x: torch.Tensor, p: float) -> None:
    if x.device.type == "mps":  # no float64 there: x * |x|**(p-1) in float32 (small exponent, few ulp)
        a = x.abs().pow_(p - 1.0)
        if p < 1.0:
            a.masked_fill_((x == 0) | x.isinf(), 1.0)
        x.mul_(a)
        return
    a = x.to(torch.float64)
    x.copy_(a.abs().pow_(p).copysign_(a))


def sign_power_eager_(x: torch.Tensor, p: float) -> None:
    """In place ``x <- sign(x) * |x|**p`` with plain torch ops (any device, dtype, layout, DTensor).

    The power is evaluated in float64 and rounded once (<= 0.5 ulp): torch's float32 ``pow`` with a scalar
    non-integer exponent is off by up to ~30 ulp on CPU for p = 1.2. Contiguous tensors are processed in
    chunks of 4M elements to bound the float64 temporary (32 MB).
    """
    n = x.numel()
    if n == 0:
        return
    p = float(p)
    with torch.no_grad():
        if n > _EAGER_CHUNK and x.is_contiguous() and not _is_dtensor(x):
            flat = x.view(-1)
            for start in range(0, n, _EAGER_CHUNK):
                _eager_block_(flat[start : start + _EAGER_CHUNK], p)
        else:
            _eager_block_(x, p)


# ----------------------------------------------------------------------------------------------------------
# fast C kernel: build, load, validate
# ----------------------------------------------------------------------------------------------------------
class _FastKernel:
    """The loaded C library: ``sign_power(ptr, n, p, nthreads)`` and ``adamw_power(...)`` take plain numbers."""

    def __init__(self, lib: Any, impl: str, flags: list[str], cached: bool):
        self.lib = lib
        self.impl = impl
        self.flags = flags
        self.cached = cached

    def sign_power(self, ptr: int, n: int, p: float, nthreads: int) -> None:
        self.lib.gp_sign_power(ptr, n, _constants(p), nthreads)

    def adamw_power(self, param: int, grad: int, exp_avg: int, exp_avg_sq: int, n: int, p: float,
                    hyper: ctypes.Array, nthreads: int) -> None:
        self.lib.gp_adamw_power(param, grad, exp_avg, exp_avg_sq, n, _constants(p), hyper, nthreads)


_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": False, "kernel": None, "reason": "not initialised"}


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split(x: float) -> tuple[float, float, float]:
    """``x`` as (hi, lo, full) float32s: ``hi`` has 12 significant bits, so ``hi * e`` is exact in float32 for
    every binary exponent ``e`` of a float32, and ``hi + lo`` carries ``x`` to float32 accuracy."""
    if x == 0.0:
        return 0.0, 0.0, 0.0
    ex = math.frexp(x)[1]
    hi = _f32(math.ldexp(round(math.ldexp(x, 12 - ex)), ex - 12))
    return hi, _f32(x - hi), _f32(x)


_FLOAT6 = ctypes.c_float * 6
_constants_cache: dict[float, ctypes.Array] = {}


def _constants(p: float) -> ctypes.Array:
    """The kernel's view of ``p``: split ``q = p - 1`` (portable q-form) and split ``p`` (AVX-512 p-form)."""
    k = _constants_cache.get(p)
    if k is None:
        if len(_constants_cache) > 64:
            _constants_cache.clear()
        k = _constants_cache[p] = _FLOAT6(*_split(float(p) - 1.0), *_split(float(p)))
    return k


def _cpu_fingerprint() -> str:
    parts = [platform.machine(), platform.processor(), sys.platform]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    parts.append(line.strip())
                if len(parts) > 8:
                    break
    except OSError:
        pass
    return "|".join(parts)


def _find_compiler() -> str | None:
    cands = [os.environ.get("CC", "")]
    try:
        import sysconfig

        cands.append((sysconfig.get_config_var("CC") or "").split(" ")[0])
    except Exception:  # pragma: no cover
        pass
    cands += ["cc", "gcc", "clang"]
    for c in cands:
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cache_dir() -> str:
    d = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_gradpower"
    )
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="hf_gradpower_")


_FLAG_SETS = (
    ("-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    ("-march=native", "-fopenmp"),
    ("-march=native",),
    ("-fopenmp",),
    (),
)


def _build(flag_sets: tuple[tuple[str, ...], ...] = _FLAG_SETS) -> _FastKernel:
    """Compile (or load from cache) the C kernel with the first flag set that works; RuntimeError if none."""
    cc = _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as exc:
        raise RuntimeError(f"C compiler {cc} not usable: {exc}") from exc
    base = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
    cdir = _cache_dir()
    fp = _cpu_fingerprint()
    errors = []
    for extra in flag_sets:
        flags = base + list(extra)
        key = hashlib.sha256("\0".join([_C_SOURCE, cc, ver, " ".join(flags), fp]).encode()).hexdigest()[:24]
        so_path = os.path.join(cdir, f"gp_kernel_{key}.so")
        cached = os.path.exists(so_path)
        if not cached:
            tmpdir = tempfile.mkdtemp(prefix="build_", dir=cdir)
            src = os.path.join(tmpdir, "gp_kernel.c")
            tmp_so = os.path.join(tmpdir, "gp_kernel.so")
            with open(src, "w") as fh:
                fh.write(_C_SOURCE)
            cmd = [cc, *flags, src, "-o", tmp_so, "-lm"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except Exception as exc:
                errors.append(f"{' '.join(extra)}: {exc}")
                shutil.rmtree(tmpdir, ignore_errors=True)
                continue
            if res.returncode != 0 or not os.path.exists(tmp_so):
                errors.append(f"{' '.join(extra)}: {res.stderr.strip()[-300:]}")
                shutil.rmtree(tmpdir, ignore_errors=True)
                continue
            os.replace(tmp_so, so_path)  # atomic: concurrent processes may race, both write valid files
            shutil.rmtree(tmpdir, ignore_errors=True)
        try:
            lib = ctypes.CDLL(so_path)
        except OSError as exc:
            errors.append(f"{' '.join(extra)}: load failed: {exc}")
            continue
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.gp_sign_power.argtypes = [ptr, i64, ptr, c_int]
        lib.gp_sign_power.restype = None
        lib.gp_adamw_power.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, c_int]
        lib.gp_adamw_power.restype = None
        lib.gp_impl.restype = ctypes.c_int
        impl = _IMPL_NAMES.get(lib.gp_impl(), "c")
        if "-fopenmp" not in extra:
            impl += "-1thread"
        return _FastKernel(lib, impl, flags, cached)
    raise RuntimeError("could not compile the C kernel: " + " || ".join(errors))


def _ulp32(ref: torch.Tensor) -> torch.Tensor:
    """Error unit: 2**-23 * |ref| (relative fp32 ulp), i.e. 2**-149 in the subnormal output range."""
    return ref.abs().clamp_min(2.0**-126) * 2.0**-23


def max_ulp_error(x: torch.Tensor, y: torch.Tensor, p: float) -> float:
    """Max error of ``y`` (float32) vs float64 ``sign(x)*|x|**p`` in units of 2**-23 * max(|ref|, 2**-126).

    Values whose reference overflows float32 must be +-inf exactly, specials must match exactly; any
    mismatch there returns ``inf``.
    """
    xd = x.detach().double().cpu().reshape(-1)
    yd = y.detach().double().cpu().reshape(-1)
    ref = xd.abs().pow(p).copysign(xd)
    ref32 = ref.float().double()
    nan_ref = torch.isnan(ref)
    if not torch.equal(nan_ref, torch.isnan(yd)):
        return math.inf
    inf_ref = torch.isinf(ref32)
    if not torch.equal(yd[inf_ref], ref32[inf_ref]):
        return math.inf
    zero = xd == 0
    if not torch.equal(torch.signbit(yd[zero]) | (yd[zero] != 0), torch.signbit(xd[zero]) | (xd[zero] != 0)):
        return math.inf
    fin = ~(nan_ref | inf_ref)
    if not fin.any():
        return 0.0
    err = (yd[fin] - ref[fin]).abs() / _ulp32(ref[fin])
    return float(err.max())


def _probe_tensor() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    bits = torch.randint(1, 0x7F800000, (40_000,), generator=g, dtype=torch.int32)
    xs = bits.view(torch.float32) * torch.where(torch.rand(40_000, generator=g) < 0.5, -1.0, 1.0)
    near1 = 1.0 + (torch.rand(8_000, generator=g) - 0.5) * 1e-2
    normal = torch.randn(16_000, generator=g) * 1e-3
    special = torch.tensor(
        [
            0.0,
            -0.0,
            math.inf,
            -math.inf,
            math.nan,
            1e-45,
            -1e-45,
            1e-40,
            1.1754942e-38,
            1.0,
            -1.0,
            3.4028235e38,
        ]
    )
    # odd length: exercises the vector tail
    return torch.cat([special, xs, near1, -near1, normal, special]).contiguous()[:-3]


_VALIDATION_PS = (0.5, 0.8, 0.9, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0)
_ULP_BOUND = 4.0


def _validate(k: _FastKernel) -> tuple[bool, str]:
    x = _probe_tensor()
    worst = 0.0
    for p in _VALIDATION_PS:
        for nthreads in (1, max(1, torch.get_num_threads())):
            y = x.clone()
            k.sign_power(y.data_ptr(), y.numel(), p, nthreads)
            err = max_ulp_error(x, y, p)
            worst = max(worst, err)
            if not err <= _ULP_BOUND:
                return False, f"p={p}: max error {err} ulp > {_ULP_BOUND}"
            ye = x.clone()
            sign_power_eager_(ye, p)
            both = torch.isfinite(ye) & torch.isfinite(y)
            if not torch.equal(torch.isfinite(ye), torch.isfinite(y)) or not torch.allclose(
                y[both], ye[both], rtol=1e-5, atol=1e-44
            ):
                return False, f"p={p}: mismatch against the eager path"
    return True, f"max error {worst:.2f} ulp on probe"


def _init_fast() -> None:
    with _lock:
        if _state["initialised"]:
            return
        t0 = time.perf_counter()
        try:
            k = _build()
        except Exception as exc:
            _state.update(kernel=None, reason=f"build failed: {exc}")
            logger.info("hf_gradpower: fast CPU kernel unavailable (%s); using eager torch ops", exc)
        else:
            try:
                ok, msg = _validate(k)
            except Exception as exc:  # pragma: no cover - defensive
                ok, msg = False, f"validation raised {exc!r}"
            if ok:
                _state.update(kernel=k, reason=msg)
            else:
                _state.update(kernel=None, reason=f"validation failed: {msg}")
                logger.warning(
                    "hf_gradpower: fast CPU kernel (%s) failed validation (%s); falling back to eager torch ops",
                    k.impl,
                    msg,
                )
        _state["init_seconds"] = time.perf_counter() - t0
        _state["initialised"] = True


def fast_kernel_available() -> bool:
    """Build/validate the fast CPU kernel if not done yet and report whether it is usable."""
    if not _state["initialised"]:
        _init_fast()
    return _state["kernel"] is not None


def fast_kernel() -> _FastKernel:
    """The validated C kernel; raises RuntimeError if it is unavailable (see :func:`fast_kernel_available`)."""
    if not fast_kernel_available():
        raise RuntimeError(f"hf_gradpower fast kernel unavailable: {_state['reason']}")
    return _state["kernel"]


def kernel_mode() -> str:
    """``HF_GRADPOWER_KERNEL``: ``auto`` (default), ``eager`` or ``fast``; raises on anything else."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "eager", "fast"):
        raise ValueError(f"{ENV_VAR} must be auto, eager or fast, got {mode!r}")
    return mode


def kernel_info() -> dict[str, Any]:
    """Diagnostics: implementation name, compiler flags, first-use seconds, validation message."""
    k = _state["kernel"]
    return {
        "initialised": _state["initialised"],
        "available": k is not None,
        "impl": k.impl if k else None,
        "flags": k.flags if k else None,
        "from_cache": k.cached if k else None,
        "init_seconds": _state.get("init_seconds"),
        "reason": _state["reason"],
        "mode": os.environ.get(ENV_VAR, "auto"),
    }


def _dense_permuted(x: torch.Tensor) -> torch.Tensor | None:
    """A contiguous view of the same memory as ``x`` with permuted dims (e.g. for ``x.t()``), or None."""
    if x.dim() < 2:
        return None
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    y = x.permute(order)
    return y if y.is_contiguous() else None


def sign_power_fast_(x: torch.Tensor, p: float) -> None:
    """The C kernel on a CPU float32 tensor (no dispatch). Raises RuntimeError if it is unavailable."""
    kernel = fast_kernel()
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError("sign_power_fast_ needs a CPU float32 tensor")
    if not (0.0 < p <= FAST_P_MAX) or not math.isfinite(p):
        raise ValueError(f"sign_power_fast_ supports 0 < p <= {FAST_P_MAX}, got {p}")
    n = x.numel()
    if n == 0:
        return
    target = x if x.is_contiguous() else _dense_permuted(x)
    nthreads = torch.get_num_threads() if n >= PARALLEL_MIN_NUMEL else 1
    if target is None:
        tmp = x.contiguous()
        kernel.sign_power(tmp.data_ptr(), n, p, nthreads)
        with torch.no_grad():
            x.copy_(tmp)
        return
    kernel.sign_power(target.data_ptr(), n, p, nthreads)


def _is_dtensor(x: torch.Tensor) -> bool:
    return hasattr(x, "_local_tensor") and hasattr(x, "placements")


def sign_power_(x: torch.Tensor, p: float) -> None:
    """In place: ``x <- sign(x) * |x|**p`` (phi(+-0) = +-0, phi(+-inf) = +-inf, phi(nan) = nan).

    ``x`` is normally float32 (any device, any strides); other floating dtypes use the eager path. ``p`` is a
    finite float > 0. CPU float32 tensors use the validated C kernel when available (see module docstring
    for ``HF_GRADPOWER_KERNEL``); everything else uses :func:`sign_power_eager_`.
    """
    p = float(p)
    if p == 1.0:
        return
    mode = kernel_mode()
    if _is_dtensor(x):
        placements = getattr(x, "placements", ())
        if any(type(pl).__name__ == "Partial" for pl in placements):
            # pending reduction: a nonlinear map must see the reduced values -> let DTensor handle it
            sign_power_eager_(x, p)
            return
        x = x._local_tensor  # elementwise op: shards / replicas can be transformed locally
    if mode == "eager" or x.device.type != "cpu" or x.dtype != torch.float32 or not (0.0 < p <= FAST_P_MAX):
        sign_power_eager_(x, p)
        return
    if x.numel() == 0:
        return
    if mode == "fast" or fast_kernel_available():
        sign_power_fast_(x, p)
    else:
        sign_power_eager_(x, p)
