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

Numerics: math in fp32 registers for fp32/bf16/fp16 storage, no float64 and no full-size temporaries.
AdamW follows torch's single-tensor formulas op for op; its scalars are derived on the host in double
(:mod:`hf_gradpower.kernels.common`). It is not bit-identical to torch's kernels (the compiler may contract
``a * b + c`` into one FMA), so tests bound the difference instead.
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

from hf_gradpower.kernels.common import AdamWScalars, plain_dense

NAME = "triton"
BLOCK = 1024  # elements per Triton program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICE_TYPES = ("cuda", "xpu")  # torch devices Triton compiles for (ROCm GPUs are "cuda" in torch)
_JIT = "hf_gradpower.kernels._triton_jit"
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 64


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
    """Launch on the tensors' own GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _jit():
    return importlib.import_module(_JIT)  # imports triton: only once this backend serves a tensor


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _tables(lists: list[list[torch.Tensor]], device: torch.device) -> tuple:
    """Address tables (one per list), numels, the block map of a multi-tensor launch, and whether every
    address is 16-byte aligned (lets the kernels vectorise); cached by address."""
    key = (device, tuple(t.data_ptr() for ts in lists for t in ts), tuple(t.numel() for t in lists[0]))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    numel = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
    blocks = (numel + BLOCK - 1) // BLOCK
    block_tensor = torch.repeat_interleave(torch.arange(len(numel), dtype=torch.int32), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(int(blocks.sum())) - torch.repeat_interleave(first_block, blocks)) * BLOCK
    addresses = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in lists]
    aligned = all(t.data_ptr() % 16 == 0 for ts in lists for t in ts)
    entry = (*(x.to(device) for x in (*addresses, numel, block_tensor, block_start)), aligned)
    _TABLE_CACHE[key] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


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


def _scale_arg(grad_scale, device: torch.device, fallback: torch.Tensor) -> torch.Tensor:
    """The loss scale as a 1-element fp32 device tensor (``fallback``, an unused pointer, when there is none)."""
    if grad_scale is None:
        return fallback
    return torch.as_tensor(grad_scale, dtype=torch.float32).reshape(1).to(device)


@torch.no_grad()
def phi_(
    tensors: Sequence[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None, coef=None
) -> None:
    """In place ``g <- coef * s * phi_p(g / s)`` (``s = grad_scale``, or 1): one launch per (device, dtype); each
    element is read once and written once; a clip coefficient ``coef`` (0-d tensor) is a second pass
    (``_foreach_mul_``) for now: the phi kernel does not take it."""
    work = [t for t in tensors if t.numel()]
    contiguous = [t if t.is_contiguous() else t.contiguous() for t in work]
    powers, k = _power_args(p), _jit()
    for (device, dtype), idx in _by_kind(range(len(work)), lambda i: (work[i].device, work[i].dtype)).items():
        addr, numel, block_tensor, block_start, aligned = _tables([[contiguous[i] for i in idx]], device)
        scale = _scale_arg(grad_scale, device, numel)
        with _on(device):
            k.phi_kernel[(block_tensor.numel(),)](
                addr, numel, block_tensor, block_start, scale, *powers,
                HAS_SCALE=grad_scale is not None, DTYPE=_tl_dtype(dtype), ALIGNED=aligned, BLOCK=BLOCK,
            )  # fmt: skip
    if coef is not None and contiguous:
        torch._foreach_mul_(contiguous, coef)
    for t, c in zip(work, contiguous, strict=True):
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
    sums = torch.zeros(len(tensors), dtype=torch.float32, device=device)
    work = [i for i, t in enumerate(tensors) if t.numel()]
    powers, k = _power_args(p), _jit()
    for dtype, idx in _by_kind(work, lambda i: tensors[i].dtype).items():
        dense = [tensors[i] if tensors[i].is_contiguous() else tensors[i].contiguous() for i in idx]
        addr, numel, block_tensor, block_start, aligned = _tables([dense], device)
        partial = torch.empty(block_tensor.numel(), dtype=torch.float32, device=device)
        with _on(device):
            k.phi_sum_sq_kernel[(block_tensor.numel(),)](
                addr, numel, block_tensor, block_start, _scale_arg(grad_scale, device, numel), partial, *powers,
                HAS_SCALE=grad_scale is not None, DTYPE=_tl_dtype(dtype), ALIGNED=aligned, BLOCK=BLOCK,
            )  # fmt: skip
        per_tensor = torch.zeros(len(idx), dtype=torch.float32, device=device).index_add_(0, block_tensor, partial)
        sums[torch.tensor(idx, device=device)] = per_tensor
    return sums


def adamw_takes(params, grads, exp_avgs, exp_avg_sqs) -> bool:
    """What the AdamW kernel reads: contiguous tensors this backend takes, state in the parameter's dtype."""
    return all(
        takes(q) and takes(g) and q.is_contiguous() and g.is_contiguous() and q.shape == g.shape
        and q.device == g.device and all(s.dtype == q.dtype and s.is_contiguous() for s in (m, v))
        for q, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    )  # fmt: skip


@torch.no_grad()
def adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, group: dict, p: float, *, coef=None) -> None:
    """One AdamW step on ``coef * phi_p(g)`` (torch AdamW's state layout); ``steps`` advance only after every
    launch returned. ``.grad`` keeps g."""
    s = AdamWScalars.of(group)
    step = torch.stack([t.detach().reshape(()) for t in steps]).to(torch.float64) + 1
    # torch's bias corrections in float64, rounded once to float32: (lr / bc1, sqrt(bc2)) per tensor
    step_hyper = torch.stack([s.lr / (1 - torch.pow(s.beta1, step)), (1 - torch.pow(s.beta2, step)).sqrt()], dim=1)
    k = _jit()
    kinds = _by_kind(range(len(params)), lambda i: (params[i].device, params[i].dtype, grads[i].dtype))
    for (device, param_dtype, grad_dtype), idx in kinds.items():
        live = [i for i in idx if params[i].numel()]
        if not live:
            continue
        lists = [[ts[i] for i in live] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        *addresses, numel, block_tensor, block_start, aligned = _tables(lists, device)
        hyper = step_hyper[live].to(device=device, dtype=torch.float32).reshape(-1)
        with _on(device):
            k.adamw_power_kernel[(block_tensor.numel(),)](
                *addresses, numel, block_tensor, block_start, hyper, _scale_arg(coef, device, numel),
                *_power_args(p), s.decay, s.beta1, s.beta2, s.eps, APPLY_PHI=p != 1.0, HAS_COEF=coef is not None,
                PARAM_DTYPE=_tl_dtype(param_dtype), GRAD_DTYPE=_tl_dtype(grad_dtype), ALIGNED=aligned, BLOCK=BLOCK,
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
                grad, buf, update, _scale_arg(coef, grad.device, buf), n, float(momentum), *_power_args(p),
                APPLY_PHI=p != 1.0, HAS_COEF=coef is not None, NESTEROV=bool(nesterov), BLOCK=BLOCK,
            )  # fmt: skip
    return update


def prepare() -> None:
    """Import the kernels (raises if triton or its backend cannot load)."""
    _jit()
