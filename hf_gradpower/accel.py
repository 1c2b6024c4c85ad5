"""GradPower on accelerators (CUDA, ROCm, XPU): phi, AdamPower and MuonPower in one fp32 pass, via Triton.

Why Triton kernels rather than a ``torch.compile``'d functional step (both were candidates, see issue 9):

* one launch per dtype for a whole list of tensors (a table of addresses, see :mod:`._triton_kernels`),
  whatever their shapes: nothing is specialised on a shape, so there is no per-shape compile and no dynamo
  cache limit to lift; ``lr``, betas, ``eps`` and ``p`` are plain float arguments, which Triton never
  specialises on, so an LR scheduler causes no recompilation; one JIT compile per dtype combination;
* the bytes moved are explicit: phi reads and writes each gradient element once; AdamPower reads g, param,
  exp_avg, exp_avg_sq once and writes the last three once (torch's fused AdamW moves the same bytes);
* a compiled step compiles one graph per parameter shape before the first step. Measured
  (``python -m benchmarks.compiled_step_compile_time``, CPU Inductor, Intel Xeon Sapphire Rapids, 2 shared
  cores): 20.8 s and 30.5 s (two runs) for the five shapes of the 34M benchmark LLaMA, then no recompile
  when lr changes; on CUDA Inductor would generate Triton kernels, one per shape, and still launch one
  kernel per parameter unless it also fuses across parameters. The Triton kernels here compile once per
  dtype combination (GPU compile time not measured yet: no GPU has run this code).
* Triton's interpreter (``TRITON_INTERPRET=1``) runs the very same kernel code on CPU tensors, so the
  suite tests it on machines without a GPU. With that variable set, CPU tensors take this path too.

Numerics: math in fp32 registers for fp32/bf16/fp16 storage, no float64 and no full-size temporaries.
AdamW follows torch's single-tensor formulas op for op (bias corrections from the step counters in
float64, rounded once to float32, as torch's Python scalars are); it is not bit-identical to torch's
kernels (the compiler may contract ``a * b + c`` into one FMA), so tests bound the difference instead.

Dispatch: :mod:`hf_gradpower.transform` sends tensors for which :func:`takes_triton_path` holds here;
``AdamPower.step`` tries :func:`adamw_power_group_step` first for every group; ``MuonAdamW`` fuses phi into
the momentum through :func:`take_fused_muon_powers` / :func:`muon_power_momentum_`. Nothing here touches
the CPU C kernel of :mod:`hf_gradpower._kernels`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict

import torch

from hf_gradpower.adamw_step import is_plain_adamw

__all__ = [
    "adamw_power_group_step", "muon_power_momentum_", "sign_power_tensors_", "take_fused_muon_powers",
    "takes_triton_path", "triton_available",
]  # fmt: skip

BLOCK = 1024  # elements per Triton program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICE_TYPES = ("cuda", "xpu")  # torch devices Triton compiles for (ROCm GPUs are "cuda" in torch)
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def takes_triton_path(t: torch.Tensor) -> bool:
    """A plain dense fp32/bf16/fp16 tensor on a Triton device (or on CPU under Triton's interpreter)."""
    if t.dtype not in DTYPES or t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return False
    on_device = t.device.type in DEVICE_TYPES or (t.device.type == "cpu" and _interpreting())
    return on_device and triton_available()


def _on(device: torch.device):
    """Launch on the tensors' own GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _kernels():
    from hf_gradpower import _triton_kernels  # imports triton: only once a Triton path is taken

    return _triton_kernels


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


@torch.no_grad()
def sign_power_tensors_(
    tensors: list[torch.Tensor], p: float, *, grad_scale: torch.Tensor | float | None = None
) -> None:
    """In place ``g <- s * phi_p(g / s)`` (``s = grad_scale``, or 1) for tensors that :func:`takes_triton_path`.

    One kernel launch per (device, dtype); each element is read once and written once.
    """
    work = [t for t in tensors if t.numel()]
    contiguous = [t if t.is_contiguous() else t.contiguous() for t in work]
    powers, k = _power_args(p), _kernels()
    for (device, dtype), idx in _by_kind(range(len(work)), lambda i: (work[i].device, work[i].dtype)).items():
        addr, numel, block_tensor, block_start, aligned = _tables([[contiguous[i] for i in idx]], device)
        if grad_scale is None:
            scale = numel  # unused pointer argument
        else:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32).reshape(1).to(device)
        with _on(device):
            k.phi_kernel[(block_tensor.numel(),)](
                    addr, numel, block_tensor, block_start, scale, *powers,
                HAS_SCALE=grad_scale is not None, DTYPE=_tl_dtype(dtype), ALIGNED=aligned, BLOCK=BLOCK,
            )  # fmt: skip
    for t, c in zip(work, contiguous, strict=True):
        if c is not t:
            t.copy_(c)


def _fusable(param: torch.Tensor, grad: torch.Tensor) -> bool:
    return (
        takes_triton_path(param) and takes_triton_path(grad) and param.is_contiguous() and grad.is_contiguous()
        and param.shape == grad.shape and param.device == grad.device
    )  # fmt: skip


@torch.no_grad()
def adamw_power_group_step(optimizer: torch.optim.AdamW, group: dict, p: float) -> bool:
    """One AdamW step on phi_p(g) for ``group``, each gradient read once; False (before any update) if the group
    is not on a Triton device or uses an option the kernel lacks. State layout is torch AdamW's; DTensor
    (FSDP2) parameters, gradients and state are updated through their local shards."""
    from hf_gradpower.transform import _local  # transform imports this module
    with_grad = [q for q in group["params"] if q.grad is not None]
    if not with_grad or not is_plain_adamw(group):
        return False
    if not all(_fusable(_local(q), _local(q.grad)) for q in with_grad):
        return False
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    params, grads, exp_avgs, exp_avg_sqs = ([_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs))
    if not all(s.dtype == q.dtype and s.is_contiguous() for q, s in zip(params * 2, exp_avgs + exp_avg_sqs, strict=True)):
        return False
    torch._foreach_add_(steps, 1)
    lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    step = torch.stack([s.detach().reshape(()) for s in steps]).to(torch.float64)
    # torch's bias corrections in float64, rounded once to float32: (lr / bc1, sqrt(bc2)) per tensor
    step_hyper = torch.stack([lr / (1 - torch.pow(beta1, step)), (1 - torch.pow(beta2, step)).sqrt()], dim=1)
    k = _kernels()
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
                *addresses, numel, block_tensor, block_start, hyper, *_power_args(p), 1.0 - lr * wd,
                beta1, beta2, eps, APPLY_PHI=p != 1.0, PARAM_DTYPE=_tl_dtype(param_dtype),
                GRAD_DTYPE=_tl_dtype(grad_dtype), ALIGNED=aligned, BLOCK=BLOCK,
            )  # fmt: skip
    return True


@torch.no_grad()
def muon_power_momentum_(
    grad: torch.Tensor, buf: torch.Tensor, momentum: float, p: float, nesterov: bool
) -> torch.Tensor:
    """Muon's momentum on phi_p(g) in one pass: ``buf.lerp_(phi(g), 1 - mu)``; returns the update,
    ``phi(g).lerp(buf, mu)`` (Nesterov, a new tensor in g's dtype) or ``buf``. ``grad`` is left as it is."""
    if not (_fusable(buf, grad) and buf.dtype in DTYPES):
        raise ValueError("muon_power_momentum_ needs contiguous same-shape fp32/bf16/fp16 grad and buf on one "
                         "Triton device; check takes_triton_path(grad) before calling it.")  # fmt: skip
    update = torch.empty_like(grad) if nesterov else buf
    n = grad.numel()
    if n:
        with _on(grad.device):
            _kernels().muon_power_momentum_kernel[((n + BLOCK - 1) // BLOCK,)](
                grad, buf, update, n, float(momentum), *_power_args(p),
                APPLY_PHI=p != 1.0, NESTEROV=bool(nesterov), BLOCK=BLOCK,
            )  # fmt: skip
    return update


def fuses_muon_power(group: dict, p: float) -> bool:
    """Whether a Muon group's phi_p can run inside its momentum kernel (every gradient, or its local shard,
    on a Triton device)."""
    if not group.get("use_muon") or p == 1.0:
        return False
    from hf_gradpower.transform import _local  # transform imports this module

    grads = [_local(q.grad) for q in group["params"] if q.grad is not None]
    return bool(grads) and all(takes_triton_path(g) and g.is_contiguous() for g in grads)


def take_fused_muon_powers(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """For ``MuonAdamW.step``: ``{id(group): p}`` of the Muon groups whose phi this step fuses into the momentum.

    Called only when the optimizer's ``applies_gradpower_in_step`` made the global hook stand aside: unless
    :func:`hf_gradpower.apply_now` already transformed the gradients, the other GradPower groups get phi here,
    times the clip coefficient that :func:`hf_gradpower.clip_and_power_` left, if any (the momentum kernel takes
    none: every group then gets phi and the coefficient in one pass over its gradients).
    """
    # attach imports transform, which imports us
    from hf_gradpower.attach import GROUP_KEY, power_groups_, take_applied_flag, take_clip_coef

    applied, coef = take_applied_flag(optimizer), take_clip_coef(optimizer)
    fused = {}
    if not applied and coef is None:
        for group in optimizer.param_groups:
            p = group.get(GROUP_KEY, 1.0)
            if fuses_muon_power(group, p):
                fused[id(group)] = p
    power_groups_(optimizer, coef=coef, phi=not applied, skip=frozenset(fused))
    return fused
