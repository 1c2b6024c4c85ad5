"""Compile time of the alternative to the Triton kernels: a ``torch.compile``'d functional phi+AdamW step.

    python -m benchmarks.compiled_step_compile_time [--device cpu|cuda]

Compiles the step as the field does (``fullgraph=True, dynamic=False``, every scalar a 0-d tensor, cache
limit lifted: one graph per parameter shape) for the distinct shapes of the 34M-parameter benchmark LLaMA,
and times the first call of each shape (compile) and a second call with a new lr (must not recompile).
The figure backs the choice of Triton in :mod:`hf_gradpower.kernels.triton`.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(8192, 512), (512, 512), (1408, 512), (512, 1408), (512,)]


def phi_adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, step_size, bc2_sqrt, q):
    """AdamW on phi(g) = g * |g|**q (fp32 math), torch's formulas."""
    g = grad.float()
    g = torch.where(grad == 0, g, g * torch.exp2(q * torch.log2(g.abs())))
    param.mul_(1 - lr * wd)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt() / bc2_sqrt + eps, value=-step_size)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    device = parser.parse_args(argv).device
    torch._dynamo.config.cache_size_limit = 1000
    compiled = torch.compile(phi_adamw_step, fullgraph=True, dynamic=False)
    result = {}
    for shape in SHAPES:
        tensors = [torch.randn(shape, device=device) for _ in range(4)]
        tensors[3].abs_()
        for lr in (1e-3, 2e-3):
            scalars = [torch.tensor(v, device=device) for v in (lr, 0.9, 0.95, 1e-8, 0.1, 1e-2, 0.3, 0.2)]
            t0 = time.perf_counter()
            compiled(*tensors, *scalars)
            if device == "cuda":
                torch.cuda.synchronize()
            result.setdefault(str(shape), []).append(time.perf_counter() - t0)
        first, second = result[str(shape)]
        print(f"shape {shape}: first call {first:.1f} s, second call (new lr) {1e3 * second:.1f} ms", flush=True)
    print(f"total first calls: {sum(v[0] for v in result.values()):.1f} s for {len(SHAPES)} shapes, torch {torch.__version__}")
    return result


if __name__ == "__main__":
    main()
