"""Worker for tests/test_sharded.py, launched with ``torchrun --nproc_per_node N``: FSDP2 runs vs one process.

Every rank also trains the unsharded one-process reference itself (same seed, the whole global batch), so
each check compares sharded and unsharded numbers inside one launch. Rank 0 writes the measured differences
to the JSON file named by ``$SHARDED_RESULTS``; the test asserts the tolerances (one launch per process count,
because starting processes costs seconds).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import patterned_tokens, tiny_llama, tiny_qwen2moe
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

import hf_gradpower as gp

GLOBAL_BATCH, SEQ, STEPS, LR, WD, CLIP = 8, 12, 10, 3e-3, 0.1, 0.5


def qwen2moe(seed: int = 0):
    model = tiny_qwen2moe(seed)
    # The router's load-balancing loss is a product of per-batch fractions: a per-rank (or per-micro-batch)
    # quantity by construction, so it differs from the global batch's; equality is checked without it.
    model.config.output_router_logits = False
    return model


MODELS = {"llama": tiny_llama, "qwen2moe": qwen2moe}


def batches(steps: int = STEPS) -> torch.Tensor:
    return patterned_tokens(steps * GLOBAL_BATCH, SEQ, seed=3).view(steps, GLOBAL_BATCH, SEQ)


def shard(model):
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    return batch.chunk(dist.get_world_size())[dist.get_rank()]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def train_step(model, opt, batch, order: str, norms: list | None = None) -> float:
    """One step; ``order``: before_clip (apply_now, clip_grad_norm_), after_clip, or fused (clip_and_power_)."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if order == "fused":
        norm = gp.clip_and_power_(opt, CLIP)
    else:
        if order == "before_clip":
            gp.apply_now(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    if norms is not None:
        norms.append(full(norm).item())
    opt.step()
    opt.zero_grad()
    if type(next(model.parameters())).__name__ == "DTensor" or hasattr(model, "module"):  # FSDP2 or DDP
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def max_param_diff(a, b) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((full(x.detach()) - full(y.detach())).abs().max().item() for x, y in pairs)


def training_matches_one_process(name: str, optim: str, order: str, ref_order: str | None = None,
                                 wrap=shard) -> dict:
    """Losses, clipping norms and parameters of a data-parallel run (``wrap``: FSDP2 by default; the batch split
    over ranks) in ``order`` vs one process with the global batch in ``ref_order`` (default: the same)."""
    ref, sharded = MODELS[name](), wrap(MODELS[name]())
    ref_opt = gp.build_optimizer(ref, optim, lr=LR, weight_decay=WD, betas=(0.9, 0.95))
    opt = gp.build_optimizer(sharded, optim, lr=LR, weight_decay=WD, betas=(0.9, 0.95))
    ref_losses, losses, ref_norms, norms = [], [], [], []
    for batch in batches():
        ref_losses.append(train_step(ref, ref_opt, batch, ref_order or order, ref_norms))
        losses.append(train_step(sharded, opt, local_rows(batch), order, norms))
    return {
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)),
        "norm_rel": max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True)),
        "clipped_steps": sum(n > CLIP for n in ref_norms),
        "param_abs": max_param_diff(sharded.module if hasattr(sharded, "module") else sharded, ref),
        "loss_drop": ref_losses[-1] / ref_losses[0],
    }


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def same_gradients_give_the_same_step(name: str) -> dict:
    """MuonPower on FSDP2 shards fed the one-process gradients: parameters after 10 steps vs one process."""
    ref, sharded = MODELS[name](), shard(MODELS[name]())
    kw = dict(lr=LR, weight_decay=WD, betas=(0.9, 0.95), foreach=True)
    ref_opt, opt = gp.build_optimizer(ref, "muonpower", **kw), gp.build_optimizer(sharded, "muonpower", **kw)
    for batch in batches():
        ref(input_ids=batch, labels=batch).loss.backward()
        for p, q in zip(sharded.parameters(), ref.parameters(), strict=True):
            p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    moved = max((p.detach() - q.detach()).abs().max().item()
                for p, q in zip(ref.parameters(), MODELS[name]().parameters(), strict=True))
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, opt.ns_stats.orthogonalised_numel)
    return {
        "param_abs": max_param_diff(sharded, ref), "moved": moved, "bytes_per_step": opt.ns_stats.bytes_communicated / STEPS,
        "orthogonalised_numel_per_rank": per_rank, "one_process_numel": ref_opt.ns_stats.orthogonalised_numel,
        "largest_matrix_numel": max(p.numel() for g in ref_opt.param_groups if g["use_muon"] for p in g["params"]),
    }


class Uneven(torch.nn.Module):
    """Shapes FSDP2 splits unevenly over 2 and 4 ranks (some ranks hold no rows or no experts)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tall = torch.nn.Parameter(torch.randn(10, 7))  # 5/5 or 3/3/3/1 rows
        self.short = torch.nn.Parameter(torch.randn(5, 12))  # 3/2 or 2/2/1/0 rows
        self.experts = torch.nn.Parameter(torch.randn(3, 6, 4))  # 2/1 or 1/1/1/0 experts, split in halves

    def groups(self):
        return [{"params": [self.tall, self.short], "use_muon": True},
                {"params": [self.experts], "use_muon": True, "ns_split": 2}]


def uneven_shards_give_the_same_step() -> dict:
    """Muon on unevenly sharded matrices and expert stacks, fed the same gradients: vs one process."""
    ref, sharded = Uneven(), Uneven()
    fully_shard(sharded)
    ref_opt, opt = gp.MuonAdamW(ref.groups(), lr=LR, weight_decay=WD), gp.MuonAdamW(sharded.groups(), lr=LR, weight_decay=WD)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(sharded.parameters(), ref.parameters(), strict=True):
            q.grad = torch.randn(q.shape, generator=g)
            p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements)
        ref_opt.step()
        opt.step()
    return {"param_abs": max_param_diff(sharded, ref), "moved": max_param_diff(ref, Uneven())}


def ddp_split_equals_every_rank_doing_all(name: str) -> dict:
    """Replicated parameters: each rank orthogonalises its share + all_gather == every rank doing all of them."""
    whole, split = MODELS[name](), MODELS[name]()
    kw = dict(lr=LR, weight_decay=WD, foreach=True)
    whole_opt = gp.build_optimizer(whole, "muonpower", **kw)
    split_opt = gp.build_optimizer(split, "muonpower", distribute_ns=True, **kw)
    for batch in batches(3):
        for model, opt in ((whole, whole_opt), (split, split_opt)):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    return {"param_abs": max_param_diff(split, whole), "bytes_per_step": split_opt.ns_stats.bytes_communicated / 3}


def checkpoint_resume_reproduces(name: str, optim: str, ckpt_dir: str) -> dict:
    """DCP save at step 5, load into a fresh sharded model + optimizer (other p), train on: == uninterrupted."""
    data = batches()
    model = shard(MODELS[name]())
    opt = gp.build_optimizer(model, optim, lr=LR, weight_decay=WD, p=1.3)
    losses = []
    for i, batch in enumerate(data):
        if i == 5:
            dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
        losses.append(train_step(model, opt, local_rows(batch), "before_clip"))

    resumed = shard(MODELS[name](seed=1))
    resumed_opt = gp.build_optimizer(resumed, optim, lr=LR, weight_decay=WD, p=1.7)
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    p_after_load = gp.gradpower_p(resumed_opt)
    resumed_losses = [train_step(resumed, resumed_opt, local_rows(batch), "before_clip") for batch in data[5:]]
    return {
        "p": p_after_load,
        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(resumed_losses, losses[5:], strict=True)),
        "param_abs": max_param_diff(resumed, model),
    }


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    checks = sys.argv[1].split(",")
    results: dict = {"world": dist.get_world_size()}
    for name in MODELS:
        if "adampower" in checks:
            for order in ("before_clip", "after_clip"):
                results[f"adampower/{name}/{order}"] = training_matches_one_process(name, "adampower", order)
        if "muonpower" in checks:
            results[f"muonpower/{name}/train"] = training_matches_one_process(name, "muonpower", "before_clip")
            results[f"muonpower/{name}/same_grads"] = same_gradients_give_the_same_step(name)
            results["muon/uneven/same_grads"] = uneven_shards_give_the_same_step()
        if "fused" in checks and name == "llama":  # clip_and_power_ vs apply_now + clip_grad_norm_ on one process
            for optim in ("adampower", "muonpower"):
                results[f"fused/{optim}/fsdp2"] = training_matches_one_process(name, optim, "fused", "before_clip")
                results[f"fused/{optim}/ddp"] = training_matches_one_process(name, optim, "fused", "before_clip", ddp)
        if "ddp" in checks:
            results[f"muonpower/{name}/ddp_split"] = ddp_split_equals_every_rank_doing_all(name)
        if "resume" in checks:
            for optim in ("adampower", "muonpower"):
                with tempfile.TemporaryDirectory() as tmp:
                    path = [tmp]
                    dist.broadcast_object_list(path)  # one folder for all ranks
                    results[f"{optim}/{name}/resume"] = checkpoint_resume_reproduces(name, optim, path[0])
                    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.environ["SHARDED_RESULTS"], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
