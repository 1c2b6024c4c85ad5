"""The Triton backend: phi, AdamW on phi(g) and Muon's momentum on phi(g) in one fp32 pass on accelerators
(CUDA, ROCm, XPU); the kernels themselves are in :mod:`hf_gradpower.kernels._triton_jit`.

Why Triton kernels rather than a ``torch.compile``'d functional step:

* one launch per dtype for a whole list of tensors (a table of addresses), whatever their shapes: nothing is
  specialised on a shape, so there is no per-shape compile and no dynamo cache limit to lift; ``lr``, betas,
  ``eps`` and ``p`` are plain arguments, which Triton never specialises on, so an LR scheduler causes no
  recompilation; one JIT compile per dtype combination;
* the bytes moved are explicit: phi reads and writes each gradient element once; AdamW reads g, param,
  exp_avg, exp_avg_sq once and writes the last three once (torch's fused AdamW moves the same bytes);
* a compiled step compiles one graph per parameter shape before the first step. Measured
  (``python -m benchmarks.compiled_step_compile_time``, CPU Inductor, Intel Xeon Sapphire Rapids, 2 shared
  cores): 20.8 s and 30.5 s (two runs) for the five shapes of the 34M benchmark LLaMA. GPU compile time of
  these kernels: not measured yet.
* Triton's interpreter (``TRITON_INTERPRET=1``) runs the very same kernel code on CPU tensors, so the suite
  tests it on machines without a GPU. With that variable set, CPU tensors take this backend (and only CPU
  tensors: the interpreter cannot read device memory).

Numerics: math in fp32 registers for fp32/bf16/fp16 storage, no float64 and no full-size temporaries, only
correctly rounded operations (see :data:`ULP_BOUND`). AdamW follows torch's single-tensor formulas op for op,
with ``sqrt_rn`` / ``div_rn`` as torch's correctly rounded sqrt and divide; every scalar derived from a
hyper-parameter (``1 - beta``, bias corrections, ``1 - lr * wd``, ``1 - momentum``) is computed on the host in
double (:mod:`hf_gradpower.kernels.common`), because a GPU receives Python floats as float32. It is not
bit-identical to torch's kernels (FMAs where torch's may round twice), so tests bound the difference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

from hf_gradpower.kernels import eager
from hf_gradpower.kernels.common import AdamWScalars, plain_dense

NAME = "triton"
# Bytes, not arithmetic, bound these kernels: clipping's norm pass only reads (4 bytes per fp32 element) and the step
# computes phi again, rather than writing phi in the norm pass (4 more bytes, and the step re-reads it).
WRITES_PHI_IN_NORM_PASS = False
BLOCK = 1024  # elements per Triton program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# phi's maximum error against float64 for fp32, 0 < p <= 4, in units of 2**-23 |phi| (the C kernel's unit):
# MEASURED_ULP with Triton's interpreter on CPU (AMD EPYC), p in steps of 0.05 over (0, 4] plus 0.999 and 1.001,
# 18.5k values of x (random bit patterns of every binade, gradient-like values, subnormals): 2.08 at p = 3.9,
# 1.09 for p in [0.5, 1.5]. The algorithm is the C kernel's per-lane one, which reached 2.54 at p = 3.992 on a
# denser sweep, hence ULP_BOUND = 2.6. Not yet measured on a GPU: the kernel uses only correctly rounded fp32
# operations (explicit FMAs, no fusion, no approximate instructions), so a GPU evaluates the same operations.
# bf16 / fp16 storage: fp32 math rounded once, <= 1 ulp of the storage dtype.
MEASURED_ULP = 2.08
ULP_BOUND = 2.6
DEVICE_TYPES = ("cuda", "xpu")  # torch devices Triton compiles for (ROCm GPUs are "cuda" in torch)
_JIT = "hf_gradpower.kernels._triton_jit"
# No contraction of a * b + c into FMAs beyond the kernels' explicit tl.fma: a GPU then evaluates the very
# fp32 operations the interpreter does (Triton's interpreter ignores compile options).
EXACT = {"enable_fp_fusion": False}


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (it ships with torch's CUDA/ROCm/XPU wheels; the CPU wheel lacks it).

    Cached: it is asked per tensor on every step, and a failed import would search ``sys.path`` each time."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def takes(t: torch.Tensor) -> bool:
    """A plain dense fp32/bf16/fp16 tensor on a Triton device (or on CPU under Triton's interpreter)."""
    if t.dtype not in DTYPES or not plain_dense(t):
        return False
    on_device = t.device.type == "cpu" if interpreting() else t.device.type in DEVICE_TYPES
    return on_device and triton_available()


def _on(device: torch.device):
    """Launch on the tensors' own GPU or XPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "xpu":
        return torch.xpu.device(device)
    return contextlib.nullcontext()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without blocking the host: pinned, then copied asynchronously (the
    pinned block is not reused before the copy ran: torch's host allocator records the copy's stream)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _jit():
    return importlib.import_module(_JIT)  # imports triton: only once this backend serves a tensor


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class _BlockMaps:
    """Block maps of multi-tensor launches, by (device, sizes), least recently used first out once their
    bytes exceed ``max_bytes``. A map is built on the device from the sizes (one small asynchronous copy):
    ``numel`` and ``first_block`` per tensor (int64), ``block_tensor`` per block of BLOCK elements (int32,
    4 bytes: 16 MB for 4e9 elements)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.maps = max_bytes, 0, OrderedDict()

    def get(self, numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (device, numels)
        hit = self.maps.get(key)
        if hit is not None:
            self.maps.move_to_end(key)
            return hit
        blocks_host = [(n + BLOCK - 1) // BLOCK for n in numels]
        numel = _to_device(torch.tensor(numels, dtype=torch.int64), device)
        blocks = (numel + BLOCK - 1) // BLOCK
        first_block = torch.cumsum(blocks, 0) - blocks
        tensor_ids = torch.arange(len(numels), dtype=torch.int32, device=device)
        block_tensor = torch.repeat_interleave(tensor_ids, blocks, output_size=sum(blocks_host))  # no sync
        entry = (numel, first_block, block_tensor)
        self.maps[key] = entry
        self.bytes += sum(t.numel() * t.element_size() for t in entry)
        while self.bytes > self.max_bytes and len(self.maps) > 1:
            _, old = self.maps.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
        return entry


_BLOCK_MAPS = _BlockMaps(64 << 20)


def _launches(lists: list[list[torch.Tensor]], device: torch.device):
    """For each of the aligned and the unaligned tensors (every address 16-byte aligned lets the kernel
    vectorise; one view into a flat buffer must not turn that off for the rest): the indices, the address
    tables (one per list, rebuilt per launch: 8 bytes per tensor) and the block map (cached by sizes)."""
    aligned = [all(ts[i].data_ptr() % 16 == 0 for ts in lists) for i in range(len(lists[0]))]
    for is_aligned in (True, False):
        idx = [i for i, a in enumerate(aligned) if a == is_aligned and lists[0][i].numel()]
        if idx:
            addresses = [_to_device(torch.tensor([ts[i].data_ptr() for i in idx], dtype=torch.int64), device)
                         for ts in lists]  # fmt: skip
            numel, first_block, block_tensor = _BLOCK_MAPS.get(tuple(lists[0][i].numel() for i in idx), device)
            yield idx, addresses, (numel, block_tensor, first_block), is_aligned


def _split(c: float) -> tuple[float, float]:
    """``c = head + tail`` with a 12-significant-bit head (so head * integer exponent is exact in fp32)."""
    if c == 0.0:
        return 0.0, 0.0
    quantum = 2.0 ** (math.floor(math.log2(abs(c))) - 11)
    head = round(c / quantum) * quantum
    return head, float(torch.tensor(c - head, dtype=torch.float32))


def _power_args(p: float) -> tuple[float, float, float, float]:
    """(qh, ql, ph, pl): the kernels' split of q = p - 1 and p."""
    return (*_split(float(p) - 1.0), *_split(float(p)))


def _by_kind(indices, kind) -> dict:
    groups: dict = {}
    for i in indices:
        groups.setdefault(kind(i), []).append(i)
    return groups


def _scale_arg(scale, device: torch.device, fallback: torch.Tensor) -> torch.Tensor:
    """A loss scale or ``coef`` as a 1-element fp32 device tensor, without a blocking copy (``fallback``, an
    unused pointer, when there is none)."""
    if scale is None:
        return fallback
    if not torch.is_tensor(scale):
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)  # a fill: no copy at all
    scale = scale.detach().reshape(1).to(torch.float32)
    return scale if scale.device == device else _to_device(scale, device)


@torch.no_grad()
def phi_(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None, coef=None
) -> None:
    """In place ``g <- coef * s * phi_p(g / s)`` (``s = grad_scale``, ``coef`` a 0-d tensor, each 1 if None): one
    launch per (device, dtype, alignment); each element is read once and written once, phi rounded to the storage
    dtype before the float32 product by ``coef``, as clipping a stored phi would."""
    contiguous = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    powers, k = _power_args(p), _jit()
    kinds = _by_kind(range(len(tensors)), lambda i: (tensors[i].device, tensors[i].dtype))
    for (device, dtype), idx in kinds.items():
        for _, (addresses,), block_map, aligned in _launches([[contiguous[i] for i in idx]], device):
            with _on(device):
                k.phi_kernel[(block_map[1].numel(),)](
                    addresses, *block_map, _scale_arg(grad_scale, device, addresses),
                    _scale_arg(coef, device, addresses), *powers, HAS_SCALE=grad_scale is not None,
                    HAS_COEF=coef is not None, DTYPE=_tl_dtype(dtype), ALIGNED=aligned, BLOCK=BLOCK, **EXACT,
                )  # fmt: skip
    for t, c in zip(tensors, contiguous, strict=True):
        if c is not t:
            t.copy_(c)


@torch.no_grad()
def phi_sum_sq(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-tensor sums of squares of what :func:`phi_` would write (read only; fp32 partial sums per block,
    added per tensor on the device). All tensors on one device; one entry per tensor."""
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    dense = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    sums = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    powers, k = _power_args(p), _jit()
    for dtype, idx in _by_kind(range(len(tensors)), lambda i: tensors[i].dtype).items():
        for sub, (addresses,), block_map, aligned in _launches([[dense[i] for i in idx]], device):
            partial = torch.empty(block_map[1].numel(), dtype=torch.float32, device=device)
            with _on(device):
                k.phi_sum_sq_kernel[(partial.numel(),)](
                    addresses, *block_map, _scale_arg(grad_scale, device, addresses), partial, *powers,
                    HAS_SCALE=grad_scale is not None, DTYPE=_tl_dtype(dtype), ALIGNED=aligned, BLOCK=BLOCK, **EXACT,
                )  # fmt: skip
            where = _to_device(torch.tensor([idx[i] for i in sub], dtype=torch.int64), device)
            sums.index_add_(0, where[block_map[1].long()], partial)
    return sums


def phi_sum_sq_(tensors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """In place ``g <- phi_p(g)`` and the per-tensor sums of squares of the result (clipping does not take this
    route on accelerators, see ``WRITES_PHI_IN_NORM_PASS``; it completes the op set)."""
    phi_(tensors, p)
    return eager.phi_sum_sq(tensors, 1.0)


def adamw_takes(params, grads, exp_avgs, exp_avg_sqs) -> bool:
    """What the AdamW kernel reads: contiguous tensors this backend takes, state in the parameter's dtype."""
    return all(
        takes(q) and takes(g) and q.is_contiguous() and g.is_contiguous() and q.shape == g.shape
        and q.device == g.device and all(s.dtype == q.dtype and s.is_contiguous() for s in (m, v))
        for q, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    )  # fmt: skip


def _step_hyper(s: AdamWScalars, steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(lr / bias_correction1, sqrt(bias_correction2))`` per tensor, float32 on ``device``: torch's formulas in
    double, rounded once, computed where the step counters live (on the host: no device sync; on the device:
    no copy), for the step about to be taken."""
    step = torch.stack([t.detach().reshape(()) for t in steps]).to(torch.float64) + 1
    hyper = torch.stack([s.step_size(step), s.bias_correction2_sqrt(step)], dim=1).to(torch.float32).reshape(-1)
    return hyper if hyper.device == device else _to_device(hyper, device)


@torch.no_grad()
def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict, p: float, *, coef=None) -> None:
    """One AdamW step on ``coef * phi_p(g)`` (torch AdamW's state layout); ``steps`` advance only after every
    launch returned. ``.grad`` keeps g."""
    s, k = AdamWScalars.of(group), _jit()
    kinds = _by_kind(range(len(params)), lambda i: (params[i].device, params[i].dtype, grads[i].dtype))
    for (device, param_dtype, grad_dtype), idx in kinds.items():
        lists = [[ts[i] for i in idx] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        for sub, addresses, block_map, aligned in _launches(lists, device):
            with _on(device):
                k.adamw_power_kernel[(block_map[1].numel(),)](
                    *addresses, *block_map, _step_hyper(s, [steps[idx[i]] for i in sub], device),
                    _scale_arg(coef, device, addresses[0]), *_power_args(p), s.decay, s.one_minus_beta1, s.beta2,
                    s.one_minus_beta2, s.eps, APPLY_PHI=p != 1.0, HAS_COEF=coef is not None,
                    PARAM_DTYPE=_tl_dtype(param_dtype), GRAD_DTYPE=_tl_dtype(grad_dtype), ALIGNED=aligned,
                    BLOCK=BLOCK, **EXACT,
                )  # fmt: skip
    torch._foreach_add_(list(steps), 1)


def muon_takes(grad: torch.Tensor, buf: torch.Tensor) -> bool:
    return (
        takes(grad) and takes(buf) and grad.is_contiguous() and buf.is_contiguous() and grad.shape == buf.shape
        and grad.device == buf.device
    )  # fmt: skip


@torch.no_grad()
def muon_momentum_(grad, buf, momentum: float, p: float, nesterov: bool, *, coef=None) -> torch.Tensor:
    """Muon's momentum on ``h = coef * phi_p(g)`` in one pass: ``buf.lerp_(h, 1 - mu)``; returns the update,
    ``h.lerp(buf, mu)`` (Nesterov, a new tensor in g's dtype) or ``buf``. ``grad`` is left as it is."""
    if not muon_takes(grad, buf):
        raise ValueError("the Triton Muon momentum needs contiguous same-shape fp32/bf16/fp16 grad and buf on one "
                         "Triton device.")  # fmt: skip
    update = torch.empty_like(grad) if nesterov else buf
    n = grad.numel()
    if n:
        with _on(grad.device):
            _jit().muon_power_momentum_kernel[((n + BLOCK - 1) // BLOCK,)](
                grad, buf, update, _scale_arg(coef, grad.device, buf), n, float(momentum), 1.0 - float(momentum),
                *_power_args(p),
                APPLY_PHI=p != 1.0, HAS_COEF=coef is not None, NESTEROV=bool(nesterov), BLOCK=BLOCK, **EXACT,
            )  # fmt: skip
    return update


def prepare() -> None:
    """Import the kernels (raises if triton or its backend cannot load)."""
    _jit()
