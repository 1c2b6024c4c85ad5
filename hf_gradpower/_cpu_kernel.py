"""Compile, load and validate the C kernel ``gradpower_kernel.c`` (shipped as package data).

The C file has no torch headers, so it compiles in well under a second with the system C compiler; the
shared library is cached on disk under a key of source, compiler, flags and CPU. Variants (flag sets):

* ``native``: ``-march=native``; the preprocessor then picks AVX-512 (``c-avx512``), AVX2+FMA
  (``c-avx2``) or the portable auto-vectorised loop (``c-autovec``, e.g. NEON on ARM).
* ``avx2``: the AVX2+FMA intrinsics without AVX-512 (what an AVX2-only x86 machine gets from ``native``).
* ``portable``: the portable C loop (built for AVX2 width on x86, for the native ISA elsewhere).

Each is tried with OpenMP first and without it (one thread, e.g. Apple clang) second. A kernel is used
only after :func:`validate` reproduced a float64 reference on a probe tensor; the dispatch module
(:mod:`hf_gradpower._kernels`) falls back to torch ops otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("gradpower_kernel.c")
# Range of p the kernel accepts; outside it the eager path is used (nothing in GradPower needs more).
FAST_P_MAX = 4.0
# Maximum error (ulp, see max_ulp_error) per implementation, rounded up from the largest measured: p in steps of
# 0.005 over (0, FAST_P_MAX] and 0.002 over [2, 4], 920k values of x (tests/test_kernels.py's sweep plus random
# gradients and bit patterns): 1.22 / 2.54 / 2.54, the latter two at p = 3.992 in the per-lane path; for p in
# [0.5, 1.5] 1.11 / 1.59 / 1.42. The test's own sweep (86 values of p) reaches 1.08 / 2.06 / 2.06 and asserts these.
ULP_BOUNDS = {"c-avx512": 1.3, "c-avx2": 2.6, "c-autovec": 2.6}
ULP_BOUND = max(ULP_BOUNDS.values())
_VALIDATION_ULP = 4.0

_IMPL_NAMES = {1: "c-autovec", 2: "c-avx512", 3: "c-avx2"}
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_AVX2 = ("-mavx2", "-mfma")
VARIANTS: dict[str, tuple[str, ...]] = {
    "native": ("-march=native", "-mprefer-vector-width=512"),
    "avx2": (*_AVX2, "-DGP_AVX2") if _X86 else (),
    "portable": ((*_AVX2,) if _X86 else ("-march=native",)) + ("-DGP_PORTABLE",),
}
_BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")

_PTRS, _I64 = ctypes.c_void_p, ctypes.c_int64


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


def _window(p: float) -> tuple[float, float]:
    """The AVX2 fast path's input range [2^-E, 2^(E+1)), E = min(124, floor(125 / p) - 1): there |x|,
    |x| 2^f (|f| <= 1/2) and |x|^p are all normal, so the kernel scales by 2^n with an integer add to the
    exponent field; inputs outside it (and zero, subnormal, inf, nan) take the exact per-lane path."""
    e = min(124, math.floor(125.0 / p) - 1)
    return math.ldexp(1.0, -e), math.ldexp(1.0, e + 1)


_FLOAT8 = ctypes.c_float * 8
_constants_cache: dict[float, ctypes.Array] = {}


def constants(p: float) -> ctypes.Array:
    """The kernel's view of ``p``: split q = p - 1, split p, and the AVX2 window."""
    k = _constants_cache.get(p)
    if k is None:
        if len(_constants_cache) > 64:
            _constants_cache.clear()
        q = float(p) - 1.0
        k = _constants_cache[p] = _FLOAT8(*_split(q), *_split(float(p)), *_window(float(p)))
    return k


def _array(ctype, values: Sequence) -> ctypes.Array:
    return (ctype * len(values))(*values)


class CpuKernel:
    """The loaded library; entries take lists of contiguous CPU float32 tensors (one OpenMP region per call)."""

    def __init__(self, lib: Any, impl: str, variant: str, flags: list[str], cached: bool):
        self.lib = lib
        self.impl = impl
        self.variant = variant
        self.flags = flags
        self.cached = cached

    def sign_power_many(self, xs: Sequence[torch.Tensor], p: float, nthreads: int, coef: float = 1.0) -> None:
        """``x <- coef * phi_p(x)`` for each tensor (``coef`` is applied to each chunk while it is in cache)."""
        rc = self.lib.gp_sign_power_many(
            _array(_PTRS, [x.data_ptr() for x in xs]), _array(_I64, [x.numel() for x in xs]), len(xs),
            constants(p), coef, nthreads,
        )
        if rc:
            raise MemoryError("gradpower kernel: out of memory")

    def phi_sumsq_many(self, xs: Sequence[torch.Tensor], p: float, nthreads: int) -> torch.Tensor:
        """Per-tensor sums of ``phi_p(x)**2`` (float64, one entry per tensor), reading each tensor once.

        Error: each phi is within ``ULP_BOUNDS`` of float64, its square and the sums are exact to 2**-53 per
        addition, so a sum is within ``2 * ULP_BOUND * 2**-23`` (relative) of the float64 reference plus
        ``numel * 2**-53``; it does not depend on ``nthreads``.
        """
        out = torch.empty(len(xs), dtype=torch.float64)
        rc = self.lib.gp_phi_sumsq_many(
            _array(_PTRS, [x.data_ptr() for x in xs]), _array(_I64, [x.numel() for x in xs]), len(xs),
            constants(p), out.data_ptr(), nthreads,
        )
        if rc:
            raise MemoryError("gradpower kernel: out of memory")
        return out

    def adamw_power_many(self, params, grads, exp_avgs, exp_avg_sqs, p: float, hyper: ctypes.Array,
                         nthreads: int, coef: float = 1.0) -> None:
        """One AdamW step on ``coef * phi_p(grad)`` per tensor; ``hyper`` holds 8 floats per tensor (see the
        C file). ``coef``: the clip coefficient (1.0 gives the unclipped step, bit for bit)."""
        ptrs = [_array(_PTRS, [t.data_ptr() for t in ts]) for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        rc = self.lib.gp_adamw_power_many(
            *ptrs, _array(_I64, [t.numel() for t in params]), len(params), constants(p), hyper, coef, nthreads
        )
        if rc:
            raise MemoryError("gradpower kernel: out of memory")


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
    d = os.environ.get("HF_GRADPOWER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_gradpower"
    )
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="hf_gradpower_")


def _compile(cc: str, flags: list[str], key: str, source: str, cdir: str) -> tuple[str, bool]:
    """Path of the cached shared library for ``key`` (compiled now if missing) and whether it was cached."""
    so_path = os.path.join(cdir, f"gp_kernel_{key}.so")
    if os.path.exists(so_path):
        return so_path, True
    tmpdir = tempfile.mkdtemp(prefix="build_", dir=cdir)
    try:
        src = os.path.join(tmpdir, "gradpower_kernel.c")
        tmp_so = os.path.join(tmpdir, "gp_kernel.so")
        with open(src, "w") as fh:
            fh.write(source)
        res = subprocess.run([cc, *flags, src, "-o", tmp_so, "-lm"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not os.path.exists(tmp_so):
            raise RuntimeError(res.stderr.strip()[-300:])
        os.replace(tmp_so, so_path)  # atomic: concurrent processes may race, both write valid files
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return so_path, False


def build(variant: str = "native") -> CpuKernel:
    """Compile (or load from cache) one variant, with OpenMP if the compiler has it; RuntimeError if impossible."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; use one of {sorted(VARIANTS)}")
    if variant == "avx2" and not _X86:
        raise RuntimeError("the avx2 variant needs an x86-64 CPU")
    cc = _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as exc:
        raise RuntimeError(f"C compiler {cc} not usable: {exc}") from exc
    source = SOURCE.read_text()
    cdir, fp = _cache_dir(), _cpu_fingerprint()
    wanted = VARIANTS[variant]
    # -mprefer-vector-width is gcc-only and optional: drop it before giving up -march=native or OpenMP
    plain = tuple(f for f in wanted if not f.startswith("-mprefer"))
    errors = []
    for extra in dict.fromkeys([(*wanted, "-fopenmp"), (*plain, "-fopenmp"), wanted, plain]):
        flags = [*_BASE_FLAGS, *extra]
        key = hashlib.sha256("\0".join([source, cc, ver, " ".join(flags), fp]).encode()).hexdigest()[:24]
        try:
            so_path, cached = _compile(cc, flags, key, source, os.path.join(cdir))
            lib = ctypes.CDLL(so_path)
        except Exception as exc:
            errors.append(f"{' '.join(extra)}: {exc}")
            continue
        lib.gp_sign_power_many.argtypes = [_PTRS, _PTRS, ctypes.c_int, _PTRS, ctypes.c_float, ctypes.c_int]
        lib.gp_phi_sumsq_many.argtypes = [_PTRS, _PTRS, ctypes.c_int, _PTRS, _PTRS, ctypes.c_int]
        lib.gp_adamw_power_many.argtypes = [_PTRS] * 5 + [ctypes.c_int, _PTRS, _PTRS, ctypes.c_float, ctypes.c_int]
        for entry in (lib.gp_sign_power_many, lib.gp_phi_sumsq_many, lib.gp_adamw_power_many, lib.gp_impl):
            entry.restype = ctypes.c_int
        impl = _IMPL_NAMES.get(lib.gp_impl(), "c")
        if "-fopenmp" not in extra:
            impl += "-1thread"
        return CpuKernel(lib, impl, variant, flags, cached)
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


def probe_tensor() -> torch.Tensor:
    """Log-uniform bit patterns, values near 1, gradient-like values and every special value, odd length."""
    g = torch.Generator().manual_seed(1234)
    bits = torch.randint(1, 0x7F800000, (40_000,), generator=g, dtype=torch.int32)
    xs = bits.view(torch.float32) * torch.where(torch.rand(40_000, generator=g) < 0.5, -1.0, 1.0)
    near1 = 1.0 + (torch.rand(8_000, generator=g) - 0.5) * 1e-2
    normal = torch.randn(16_000, generator=g) * 1e-3
    special = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 1.0, -1.0, 3.4028235e38]
    )
    return torch.cat([special, xs, near1, -near1, normal, special]).contiguous()[:-3]


_VALIDATION_PS = (0.5, 0.8, 0.9, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0)


def validate(k: CpuKernel, reference_) -> tuple[bool, str]:
    """Check ``k`` against float64 on the probe (error <= 4 ulp, specials exact) and against ``reference_``
    (the eager torch path), single- and multi-threaded. Returns (ok, message)."""
    x = probe_tensor()
    worst = 0.0
    for p in _VALIDATION_PS:
        for nthreads in (1, max(1, torch.get_num_threads())):
            y = x.clone()
            k.sign_power_many([y], p, nthreads)
            err = max_ulp_error(x, y, p)
            worst = max(worst, err)
            if not err <= _VALIDATION_ULP:
                return False, f"p={p}: max error {err} ulp > {_VALIDATION_ULP}"
            ye = x.clone()
            reference_(ye, p)
            both = torch.isfinite(ye) & torch.isfinite(y)
            if not torch.equal(torch.isfinite(ye), torch.isfinite(y)) or not torch.allclose(
                y[both], ye[both], rtol=1e-5, atol=1e-44
            ):
                return False, f"p={p}: mismatch against the eager path"
    return _validate_clipping(k, x[torch.isfinite(x) & (x.abs() < 1e9)], worst)


def _validate_clipping(k: CpuKernel, x: torch.Tensor, worst: float) -> tuple[bool, str]:
    """The entries clipping uses: sums of phi(x)^2 against float64 (within 2 * _VALIDATION_ULP ulp, relative) and
    phi with a clip coefficient, which must be phi then one float32 multiply, bit for bit."""
    coef = 0.3125  # a power of two times 5: the product is rounded
    for p in (0.8, 1.2, 2.0):
        for nthreads in (1, max(1, torch.get_num_threads())):
            parts = [x[: len(x) // 3], x[len(x) // 3 :]]
            got = k.phi_sumsq_many(parts, p, nthreads)
            want = torch.stack([(t.double().abs() ** (2 * p)).sum() for t in parts])
            rel = float(((got - want).abs() / want).max())
            if not rel <= 2 * _VALIDATION_ULP * 2.0**-23:
                return False, f"p={p}: sum of squares off by {rel:.3g} (relative)"
            y, z = x.clone(), x.clone()
            k.sign_power_many([y], p, nthreads, coef=coef)
            k.sign_power_many([z], p, nthreads)
            if not torch.equal(y, z * coef):
                return False, f"p={p}: phi with a clip coefficient is not phi times the coefficient"
    return True, f"max error {worst:.2f} ulp on probe"
