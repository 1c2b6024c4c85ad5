"""The CPU C backend: ``gradpower_kernel.c`` (package data) compiled at first use, validated, called by ctypes.

The C file has no torch headers, so it compiles in well under a second with the system C compiler; the
shared library is cached on disk under a key of source, compiler, flags and CPU. Variants (flag sets):

* ``native``: ``-march=native``; the preprocessor then picks AVX-512 (``c-avx512``), AVX2+FMA
  (``c-avx2``) or the portable auto-vectorised loop (``c-autovec``, e.g. NEON on ARM).
* ``avx2``: the AVX2+FMA intrinsics without AVX-512 (what an AVX2-only x86 machine gets from ``native``).
* ``portable``: the portable C loop (built for AVX2 width on x86, for the native ISA elsewhere).

Each is tried with OpenMP first and without it (one thread, e.g. Apple clang) second. A kernel is used only
after :func:`validate` reproduced a float64 reference on a probe tensor; otherwise the dispatcher
(:mod:`hf_gradpower.kernels.dispatch`) serves CPU tensors with the eager backend.

Operations (the set every backend offers): :func:`phi_` (float32 tensors in one call; bf16/fp16 through a
float32 copy), :func:`adamw_` (float32 parameters, gradients and state), :func:`muon_momentum_` (phi by the
kernel, the momentum by torch ops), :func:`phi_sum_sq` (read only, the squares summed in float64). Each takes
a clip coefficient ``coef`` (0-d CPU tensor), multiplied into phi(g) in the same pass.

Accuracy of phi against float64, for 0 < p <= 4 (larger ``p`` is served by the eager backend), measured on
CPU: maximum 1.22 ulp for AVX-512, 2.54 for AVX2 and the portable C loop (:data:`ULP_BOUNDS`), specials exact.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_gradpower.kernels import eager
from hf_gradpower.kernels.common import AdamWScalars, plain_dense

NAME = "c"
# On a CPU core phi's arithmetic, not memory, sets the pace: clipping writes phi in its norm pass rather than
# computing it again at the step (hf_gradpower.clipping has the measurements).
WRITES_PHI_IN_NORM_PASS = True
logger = logging.getLogger(__name__)
ENV_VAR = "HF_GRADPOWER_KERNEL"
SOURCE = Path(__file__).resolve().parents[1] / "gradpower_kernel.c"
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

    def phi_sumsq_many(self, xs: Sequence[torch.Tensor], p: float, nthreads: int, write: bool = False) -> torch.Tensor:
        """Per-tensor sums of ``phi_p(x)**2`` (float64, one entry per tensor), reading each tensor once
        (``write``: and storing phi_p(x) into it in the same pass).

        Error: each phi is within ``ULP_BOUNDS`` of float64, its square and the sums are exact to 2**-53 per
        addition, so a sum is within ``2 * ULP_BOUND * 2**-23`` (relative) of the float64 reference plus
        ``numel * 2**-53``; it does not depend on ``nthreads``.
        """
        out = torch.empty(len(xs), dtype=torch.float64)
        rc = self.lib.gp_phi_sumsq_many(
            _array(_PTRS, [x.data_ptr() for x in xs]), _array(_I64, [x.numel() for x in xs]), len(xs),
            constants(p), out.data_ptr(), int(write), nthreads,
        )
        if rc:
            raise MemoryError("gradpower kernel: out of memory")
        return out

    def adamw_power_many(self, params, grads, exp_avgs, exp_avg_sqs, p: float, hyper: ctypes.Array,
                         nthreads: int, coef: float = 1.0) -> None:
        """One AdamW step on ``coef * phi_p(grad)`` per tensor (p = 1: on ``coef * grad``, no phi); ``hyper`` holds
        8 floats per tensor (see the C file). ``coef``: the clip coefficient (1.0 gives the unclipped step)."""
        ptrs = [_array(_PTRS, [t.data_ptr() for t in ts]) for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        rc = self.lib.gp_adamw_power_many(
            *ptrs, _array(_I64, [t.numel() for t in params]), len(params), None if p == 1.0 else constants(p), hyper,
            coef, nthreads,
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
        lib.gp_phi_sumsq_many.argtypes = [_PTRS, _PTRS, ctypes.c_int, _PTRS, _PTRS, ctypes.c_int, ctypes.c_int]
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


# ----------------------------------------------------------------------------------------------------------
# the backend: first use, state, operations
# ----------------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_state: dict[str, Any] = {"initialised": False, "kernel": None, "reason": "not initialised"}


def load_variant(variant: str = "native") -> CpuKernel:
    """Build and validate one kernel variant; RuntimeError if it fails."""
    k = build(variant)
    ok, msg = validate(k, eager.sign_power_)
    if not ok:
        raise RuntimeError(f"kernel {k.impl} failed validation: {msg}")
    return k


def _init_fast() -> None:
    with _lock:
        if _state["initialised"]:
            return
        t0 = time.perf_counter()
        try:
            k = build()
        except Exception as exc:
            _state.update(kernel=None, reason=f"build failed: {exc}")
            logger.info("hf_gradpower: C kernel unavailable (%s); CPU tensors use eager torch ops", exc)
        else:
            try:
                ok, msg = validate(k, eager.sign_power_)
            except Exception as exc:  # pragma: no cover - defensive
                ok, msg = False, f"validation raised {exc!r}"
            if ok:
                _state.update(kernel=k, reason=msg)
            else:
                _state.update(kernel=None, reason=f"validation failed: {msg}")
                logger.warning(
                    "hf_gradpower: C kernel (%s) failed validation (%s); CPU tensors use eager torch ops. "
                    "Set %s=eager to skip the C kernel.", k.impl, msg, ENV_VAR,
                )  # fmt: skip
        _state["init_seconds"] = time.perf_counter() - t0
        _state["initialised"] = True


def fast_kernel_available() -> bool:
    """Build/validate the C kernel if not done yet and report whether it is usable."""
    if not _state["initialised"]:
        _init_fast()
    return _state["kernel"] is not None


def fast_kernel() -> CpuKernel:
    """The validated C kernel; raises RuntimeError if it is unavailable (see :func:`fast_kernel_available`)."""
    if not fast_kernel_available():
        raise RuntimeError(f"hf_gradpower C kernel unavailable: {_state['reason']}")
    return _state["kernel"]


@contextlib.contextmanager
def using_kernel(kernel: CpuKernel | None) -> Iterator[None]:
    """Temporarily run CPU tensors through ``kernel`` (None: the eager backend); for benchmarks."""
    with _lock:
        saved = dict(_state)
        _state.update(initialised=True, kernel=kernel, reason="selected by using_kernel")
    try:
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)


def kernel_info() -> dict[str, Any]:
    """Diagnostics: implementation name, compiler flags, first-use seconds, validation message."""
    k = _state["kernel"]
    return {
        "initialised": _state["initialised"], "available": k is not None, "impl": k.impl if k else None,
        "flags": k.flags if k else None, "from_cache": k.cached if k else None,
        "init_seconds": _state.get("init_seconds"), "reason": _state["reason"],
        "mode": os.environ.get(ENV_VAR, "auto"),
    }  # fmt: skip


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def takes(t: torch.Tensor, p: float) -> bool:
    """A plain CPU float tensor and an exponent the kernel accepts (the kernel itself is not built here)."""
    return t.device.type == "cpu" and t.dtype in DTYPES and plain_dense(t) and 0.0 < p <= FAST_P_MAX


def dense_cpu_f32(t: torch.Tensor) -> bool:
    """A plain dense contiguous CPU float32 tensor: what the kernel reads in place."""
    return plain_dense(t) and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _dense_permuted(x: torch.Tensor) -> torch.Tensor | None:
    """A contiguous view of the same memory as ``x`` with permuted dims (e.g. for ``x.t()``), or None."""
    if x.dim() < 2:
        return None
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    y = x.permute(order)
    return y if y.is_contiguous() else None


def _phi_one_(kernel: CpuKernel, x: torch.Tensor, p: float, grad_scale) -> None:
    """phi of one tensor that is not a dense float32 one: a permuted view, or a float32 copy written back (the
    loss scale divided out in float32)."""
    target = _dense_permuted(x) if x.dtype == torch.float32 and grad_scale is None else None
    if target is not None:
        kernel.sign_power_many([target], p, torch.get_num_threads())
        return
    tmp = x.contiguous().float()
    if grad_scale is not None:
        tmp.div_(grad_scale)
    kernel.sign_power_many([tmp], p, torch.get_num_threads())
    x.copy_(tmp if grad_scale is None else tmp.mul_(grad_scale))


@torch.no_grad()
def phi_(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None, coef=None
) -> None:
    """In place ``g <- coef * s * phi_p(g / s)``: every dense float32 tensor in ONE kernel call (one OpenMP
    region; the coefficient multiplies each chunk while it is in cache)."""
    kernel = fast_kernel()
    factor = 1.0 if coef is None else float(coef)
    dense = [t for t in tensors if t.numel() and dense_cpu_f32(t)]
    if grad_scale is not None and dense:
        torch._foreach_div_(dense, grad_scale)
    if len({t.data_ptr() for t in dense}) == len(dense):  # a tensor twice would race with itself
        kernel.sign_power_many(dense, p, torch.get_num_threads(), coef=factor)
    else:
        for t in dense:
            kernel.sign_power_many([t], p, 1, coef=factor)
    if grad_scale is not None and dense:
        torch._foreach_mul_(dense, grad_scale)
    for t in tensors:
        if t.numel() and not dense_cpu_f32(t):
            _phi_one_(kernel, t, p, grad_scale)
            if coef is not None:
                t.mul_(coef)


@torch.no_grad()
def phi_sum_sq(tensors, p: float, *, grad_scale=None) -> torch.Tensor:
    """Per-tensor sums of squares of what :func:`phi_` would write, read only: the dense float32 tensors in ONE
    kernel call (squares and sums in float64, see ``CpuKernel.phi_sumsq_many``), float32 results. p = 1 and
    other layouts: the eager backend (the AVX-512 phi at p = 1 is within an ulp of g, not g itself)."""
    dense = [t for t in tensors if dense_cpu_f32(t)] if float(p) != 1.0 else []
    if not dense:
        return eager.phi_sum_sq(tensors, p, grad_scale=grad_scale)
    sums = fast_kernel().phi_sumsq_many(dense, p, torch.get_num_threads())
    if grad_scale is not None:  # the kernel read s g: sum of (s phi(g))^2 = s^(2 - 2p) sum of phi(s g)^2
        sums = sums * torch.as_tensor(grad_scale, dtype=torch.float64).pow(2.0 - 2.0 * float(p))
    by_id = dict(zip(map(id, dense), sums, strict=True))
    rest = [t for t in tensors if id(t) not in by_id]
    if rest:
        by_id.update(zip(map(id, rest), eager.phi_sum_sq(rest, p, grad_scale=grad_scale).double(), strict=True))
    return torch.stack([by_id[id(t)] for t in tensors]).float()


@torch.no_grad()
def phi_sum_sq_(tensors, p: float) -> torch.Tensor:
    """In place ``g <- phi_p(g)`` and the per-tensor sums of squares of the result: the dense float32 tensors read
    and written once in ONE kernel call (float64 sums), float32 results; other layouts by the eager backend."""
    dense = [t for t in tensors if dense_cpu_f32(t)] if float(p) != 1.0 else []
    if len({t.data_ptr() for t in dense}) != len(dense):  # a tensor twice would race with itself
        dense = []
    if not dense:
        return eager.phi_sum_sq_(tensors, p)
    by_id = dict(zip(map(id, dense), fast_kernel().phi_sumsq_many(dense, p, torch.get_num_threads(), write=True),
                     strict=True))  # fmt: skip
    rest = [t for t in tensors if id(t) not in by_id]
    if rest:
        by_id.update(zip(map(id, rest), eager.phi_sum_sq_(rest, p).double(), strict=True))
    return torch.stack([by_id[id(t)] for t in tensors]).float()


def adamw_hyper(group: dict, steps: Sequence[torch.Tensor]) -> ctypes.Array:
    """The kernel's 8 floats per tensor for the step about to be taken: torch's formulas in double, rounded
    once to float32 (1 - lr wd, beta1, 1 - beta1, beta2, 1 - beta2, lr / bc1, 1 / sqrt(bc2), eps)."""
    s = AdamWScalars.of(group)
    rows: dict[float, tuple[float, ...]] = {}
    hyper: list[float] = []
    for step_t in steps:
        step = float(step_t) + 1.0
        if step not in rows:
            rows[step] = (s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.step_size(step),
                          1.0 / s.bias_correction2_sqrt(step), s.eps)  # fmt: skip
        hyper.extend(rows[step])
    return (ctypes.c_float * len(hyper))(*hyper)


def adamw_takes(params, grads, exp_avgs, exp_avg_sqs) -> bool:
    """Every tensor a dense contiguous CPU float32 one (the kernel's only layout)."""
    return all(dense_cpu_f32(t) for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts)


@torch.no_grad()
def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict, p: float, *, coef=None) -> None:
    """One AdamW step on ``coef * phi_p(g)`` (p = 1: on ``coef * g``) for all tensors in ONE kernel call; ``steps``
    advance only after it returned. ``.grad`` keeps g."""
    hyper = adamw_hyper(group, steps)
    factor = 1.0 if coef is None else float(coef)
    fast_kernel().adamw_power_many(params, grads, exp_avgs, exp_avg_sqs, p, hyper, torch.get_num_threads(), factor)
    torch._foreach_add_(steps, 1)


@torch.no_grad()
def muon_momentum_(grad, buf, momentum: float, p: float, nesterov: bool, *, coef=None) -> torch.Tensor:
    """Muon's momentum on phi_p(grad) (phi by the kernel into a copy, the lerp by torch); returns the update."""
    h = grad.clone()
    phi_([h], p, coef=coef)
    return eager.momentum_from_(h, buf, momentum, nesterov)


def prepare() -> None:
    """Build and validate the kernel now (raises RuntimeError with the reason if it cannot be used)."""
    fast_kernel()
