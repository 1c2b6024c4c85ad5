"""Fast in-place GradPower transform ``x <- sign(x) * |x|**p``.

Two implementations are provided:

* :func:`sign_power_eager_` -- plain, accurate torch ops (works on any device and for DTensor). It is the
  fallback and the reference the fast path is validated against.
* a fast CPU kernel for float32: a small C file (no torch headers, so it compiles in well under a second)
  built at first use with the system C compiler (``-O3 -march=native``, OpenMP sharing torch's libgomp),
  loaded with :mod:`ctypes` and cached on disk. On CPUs with AVX-512 it uses ``getexp``/``getmant``,
  a 32-entry in-register table (``vpermi2ps``) for log2 of the mantissa, a degree-6 polynomial for the
  fractional power of two and ``scalef`` for the final scaling (single rounding, correct overflow to inf and
  underflow to subnormals). Elsewhere a portable auto-vectorised C loop with the same algorithm is used.

Algorithm (both C variants): with ``q = p - 1``, ``|x| = m * 2**e`` and ``|x|**p = |x| * 2**(q*e + q*log2 m)``.
``q*e`` is computed exactly as ``qh*e + ql*e`` (``qh`` has 12 significant bits, so ``qh*e`` is exact in
float32), its integer part is split off before adding ``q*log2(m)``, so the fractional exponent keeps full
float32 accuracy even for |x| near 1e-38 or 1e38. Measured max error is below 2 ulp (bound asserted: 4 ulp).

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
_FAST_P_MAX = 16.0
# Below this many elements the kernel runs single-threaded (OpenMP fork/join would cost more than it saves).
_PARALLEL_MIN_NUMEL = 1 << 15

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define GP_IMPL 2
static void kern(float *restrict x, int64_t n, float qh, float ql, float qf,
                 const float *tinv, const float *tlog) {
  const __m512 vinv0 = _mm512_loadu_ps(tinv), vinv1 = _mm512_loadu_ps(tinv + 16);
  const __m512 vlog0 = _mm512_loadu_ps(tlog), vlog1 = _mm512_loadu_ps(tlog + 16);
  const __m512 vqh = _mm512_set1_ps(qh), vql = _mm512_set1_ps(ql), vqf = _mm512_set1_ps(qf);
  const __m512 one = _mm512_set1_ps(1.0f);
  /* log2(1+r), |r| < 1/64: Taylor series / ln 2 */
  const __m512 l1 = _mm512_set1_ps(1.4426950408889634f), l2 = _mm512_set1_ps(-0.7213475204444817f),
               l3 = _mm512_set1_ps(0.48089834696298783f), l4 = _mm512_set1_ps(-0.36067376022224085f);
  /* 2^f on [-0.5, 0.5], rel. error 2.6e-9 */
  const __m512 e0 = _mm512_set1_ps(0.9999999999595286f), e1 = _mm512_set1_ps(0.6931472067218104f),
               e2 = _mm512_set1_ps(0.24022651213786558f), e3 = _mm512_set1_ps(0.055503271903370205f),
               e4 = _mm512_set1_ps(0.009618025577416789f), e5 = _mm512_set1_ps(0.0013400441714101908f),
               e6 = _mm512_set1_ps(0.00015469740156558607f);
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 lm = (n - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(lm, x + i);
    /* qnan | +0 | -0 | +inf | -inf | snan: left unchanged (phi(0)=0, phi(inf)=inf, phi(nan)=nan) */
    __mmask16 sp = _mm512_fpclass_ps_mask(v, 0x9f);
    __m512 e = _mm512_getexp_ps(v);                                       /* floor(log2|x|), subnormals ok */
    __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero); /* |x| / 2^e in [1, 2) */
    __m512 ms = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src); /* same with sign of x */
    __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 18);           /* low 5 bits: mantissa top */
    __m512 inv = _mm512_permutex2var_ps(vinv0, idx, vinv1);
    __m512 lc = _mm512_permutex2var_ps(vlog0, idx, vlog1);
    __m512 r = _mm512_fmsub_ps(m, inv, one);
    __m512 pl = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(l4, r, l3), r, l2), r, l1);
    __m512 L = _mm512_fmadd_ps(pl, r, lc);                                 /* log2(m) */
    __m512 ph = _mm512_mul_ps(vqh, e);                                     /* exact */
    __m512 n1 = _mm512_roundscale_ps(ph, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fmadd_ps(vql, e, _mm512_sub_ps(ph, n1));
    f = _mm512_fmadd_ps(vqf, L, f);
    __m512 n2 = _mm512_roundscale_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f = _mm512_sub_ps(f, n2);
    __m512 P = _mm512_fmadd_ps(e6, f, e5);
    P = _mm512_fmadd_ps(P, f, e4);
    P = _mm512_fmadd_ps(P, f, e3);
    P = _mm512_fmadd_ps(P, f, e2);
    P = _mm512_fmadd_ps(P, f, e1);
    P = _mm512_fmadd_ps(P, f, e0);
    __m512 M = _mm512_mul_ps(ms, P);
    __m512 E = _mm512_add_ps(_mm512_add_ps(e, n1), n2);
    __m512 res = _mm512_scalef_ps(M, E);                                   /* M * 2^E, one rounding */
    _mm512_mask_storeu_ps(x + i, lm & (__mmask16)~sp, res);
  }
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

static void kern(float *restrict x, int64_t n, float qh, float ql, float qf,
                 const float *tinv, const float *tlog) {
  (void)tinv; (void)tlog;
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    float xi = x[i];
    uint32_t b = f2u(xi);
    uint32_t a = b & 0x7fffffffu;
    int special = (a - 1u) >= 0x7f7fffffu;                /* zero, inf or nan: unchanged */
    int sub = a < 0x00800000u;
    float af = u2f(a) * (sub ? 16777216.0f : 1.0f);       /* normalise subnormals */
    int32_t ab = (int32_t)f2u(af) - 0x3f3504f3;
    int32_t e = (ab >> 23) - (sub ? 24 : 0);
    float m = u2f((uint32_t)(ab & 0x007fffff) + 0x3f3504f3u); /* m in [sqrt(.5), sqrt(2)) */
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
    x[i] = special ? xi : res;
  }
}
#endif

int gp_impl(void) { return GP_IMPL; }

void gp_sign_power(float *x, int64_t n, float qh, float ql, float qf, int nthreads) {
  float tinv[32], tlog[32];
  for (int i = 0; i < 32; i++) {
    double c = 1.0 + (i + 0.5) / 32.0;
    tinv[i] = (float)(1.0 / c);
    tlog[i] = (float)(-log2((double)tinv[i]));
  }
  const int64_t CH = 16384;
#ifdef _OPENMP
  if (nthreads > 1 && n > 2 * CH) {
    int64_t nch = (n + CH - 1) / CH;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nch; c++) {
      int64_t lo = c * CH, hi = lo + CH < n ? lo + CH : n;
      kern(x + lo, hi - lo, qh, ql, qf, tinv, tlog);
    }
    return;
  }
#else
  (void)nthreads;
#endif
  kern(x, n, qh, ql, qf, tinv, tlog);
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
    def __init__(self, fn: Any, impl: str, flags: list[str], cached: bool):
        self.fn = fn
        self.impl = impl
        self.flags = flags
        self.cached = cached


_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": False, "kernel": None, "reason": "not initialised"}


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split_q(p: float) -> tuple[float, float, float]:
    """q = p - 1 as (qh, ql, qf): qh has 12 significant bits (so qh * e is exact in fp32), ql = q - qh."""
    q = float(p) - 1.0
    if q == 0.0:
        return 0.0, 0.0, 0.0
    ex = math.frexp(q)[1]
    qh = _f32(math.ldexp(round(math.ldexp(q, 12 - ex)), ex - 12))
    return qh, _f32(q - qh), _f32(q)


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


def _build() -> _FastKernel:
    """Compile (or load from cache) the C kernel. Raises RuntimeError when impossible."""
    cc = _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as exc:
        raise RuntimeError(f"C compiler {cc} not usable: {exc}") from exc
    base = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
    flag_sets = [
        ["-march=native", "-mprefer-vector-width=512", "-fopenmp"],
        ["-march=native", "-fopenmp"],
        ["-march=native"],
        ["-fopenmp"],
        [],
    ]
    cdir = _cache_dir()
    fp = _cpu_fingerprint()
    errors = []
    for extra in flag_sets:
        flags = base + extra
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
        fn = lib.gp_sign_power
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_int,
        ]
        fn.restype = None
        lib.gp_impl.restype = ctypes.c_int
        impl = _IMPL_NAMES.get(lib.gp_impl(), "c")
        if "-fopenmp" not in extra:
            impl += "-1thread"
        return _FastKernel(fn, impl, flags, cached)
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


_VALIDATION_PS = (0.5, 0.8, 0.9, 1.1, 1.2, 1.5, 2.0, 3.0)
_ULP_BOUND = 4.0


def _validate(k: _FastKernel) -> tuple[bool, str]:
    x = _probe_tensor()
    worst = 0.0
    for p in _VALIDATION_PS:
        for nthreads in (1, max(1, torch.get_num_threads())):
            y = x.clone()
            qh, ql, qf = _split_q(p)
            k.fn(y.data_ptr(), y.numel(), qh, ql, qf, nthreads)
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
    if not fast_kernel_available():
        raise RuntimeError(f"hf_gradpower fast kernel unavailable: {_state['reason']}")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError("sign_power_fast_ needs a CPU float32 tensor")
    if not (0.0 < p <= _FAST_P_MAX) or not math.isfinite(p):
        raise ValueError(f"sign_power_fast_ supports 0 < p <= {_FAST_P_MAX}, got {p}")
    n = x.numel()
    if n == 0:
        return
    target = x if x.is_contiguous() else _dense_permuted(x)
    qh, ql, qf = _split_q(p)
    fn = _state["kernel"].fn
    if target is None:
        tmp = x.contiguous()
        fn(tmp.data_ptr(), n, qh, ql, qf, torch.get_num_threads() if n >= _PARALLEL_MIN_NUMEL else 1)
        with torch.no_grad():
            x.copy_(tmp)
        return
    fn(target.data_ptr(), n, qh, ql, qf, torch.get_num_threads() if n >= _PARALLEL_MIN_NUMEL else 1)


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
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "eager", "fast"):
        raise ValueError(f"{ENV_VAR} must be auto, eager or fast, got {mode!r}")
    if _is_dtensor(x):
        placements = getattr(x, "placements", ())
        if any(type(pl).__name__ == "Partial" for pl in placements):
            # pending reduction: a nonlinear map must see the reduced values -> let DTensor handle it
            sign_power_eager_(x, p)
            return
        x = x._local_tensor  # elementwise op: shards / replicas can be transformed locally
    if mode == "eager" or x.device.type != "cpu" or x.dtype != torch.float32 or not (0.0 < p <= _FAST_P_MAX):
        sign_power_eager_(x, p)
        return
    if x.numel() == 0:
        return
    if mode == "fast" or fast_kernel_available():
        sign_power_fast_(x, p)
    else:
        sign_power_eager_(x, p)
