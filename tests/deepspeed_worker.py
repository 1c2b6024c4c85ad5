"""Worker for tests/test_deepspeed.py (``torchrun``, DeepSpeed's CPU accelerator, gloo): AdamPower under ZeRO-1/2.

The client optimizer is the registry's AdamPower; DeepSpeed replaces its param groups with flat fp32
partitions of the reduced (averaged) gradients and clips them itself (``gradient_clipping``), so phi runs
after clipping, on each rank's partition. Compared with one process on the whole batch (clip, then AdamPower)
and, to show the comparison can fail, with plain AdamW. Rank 0 writes JSON to ``$DEEPSPEED_RESULTS``.
"""

from __future__ import annotations

import json
import os

import deepspeed
import torch
import torch.distributed as dist
from conftest import patterned_tokens, tiny_llama

import hf_gradpower as gp

STEPS, GLOBAL_BATCH, LR, CLIP = 6, 8, 3e-3, 0.5


def one_process(optim: str, data) -> list[float]:
    model = tiny_llama()
    opt = gp.build_optimizer(model, optim, lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    for batch in data:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def zero(stage: int, data) -> tuple[list[float], list]:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = tiny_llama()
    opt = gp.build_optimizer(model, "adampower", lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
              "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    seen = []  # what AdamPower steps on: DeepSpeed's partitions
    opt.register_step_pre_hook(lambda o, *_: seen.extend(
        (q.ndim, str(q.dtype), q.numel()) for g in o.param_groups for q in g["params"] if q.grad is not None))
    losses = []
    for batch in data:
        local = batch.chunk(world)[rank]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, seen


def rel(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    data = patterned_tokens(STEPS * GLOBAL_BATCH, 12, seed=3).view(STEPS, GLOBAL_BATCH, 12)
    reference, baseline = one_process("adampower", data), one_process("adamw", data)
    results = {"world": dist.get_world_size(), "baseline_rel": rel(baseline, reference),
               "model_numel": sum(p.numel() for p in tiny_llama().parameters())}
    for stage in (1, 2):
        losses, seen = zero(stage, data)
        results[f"zero{stage}"] = {"loss_rel": rel(losses, reference), "seen": sorted(set(seen))}
    if dist.get_rank() == 0:
        with open(os.environ["DEEPSPEED_RESULTS"], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
