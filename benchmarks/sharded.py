"""Sharded MuonPower under FSDP2: Newton-Schulz per owner rank vs gathering every matrix on every rank.

    python -m benchmarks.sharded [--procs 2 4] [--steps 12] [--out benchmarks/results]

Launches ``torchrun --nproc_per_node N`` (gloo, CPU) for each N; every rank builds two identical
``fully_shard``-ed LLaMAs with MuonPower: one takes the owner route of :mod:`hf_gradpower.muon_sharded`
(all-to-all of row shards to each matrix's owner, Newton-Schulz there, all-to-all back), the other gathers
every matrix on every rank (bf16 all_gather, Newton-Schulz of all matrices on every rank, keep own rows).
Their optimizer steps are timed alternately on the same gradients. Reports per step the median and
spread of the step time, bytes each rank sends + receives for Newton-Schulz, the bytes of whole matrices a
rank materialises, and each rank's peak RSS; writes Markdown + JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

WIRE = torch.bfloat16


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
                return f"{line.split(':', 1)[1].strip()} ({isa}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gather_everywhere(jobs, group=None) -> int:
    """The simple form: every rank gathers every whole matrix (bf16) and orthogonalises all of them."""
    from hf_gradpower.muon_sharded import row_counts

    world, me = dist.get_world_size(group), dist.get_rank(group)
    sent = 0
    for job in jobs:
        rows = row_counts(job.global_shape[0], world)
        cols = job.global_shape[1]
        width = max(rows) * cols
        padded = torch.zeros(width, dtype=WIRE)
        padded[: job.local_update.numel()] = job.local_update.reshape(-1).to(WIRE)
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=group)
        whole = torch.cat([p[: r * cols] for p, r in zip(pieces, rows, strict=True)]).view(job.global_shape)
        start = sum(rows[:me])
        job.result = job.orthogonalise(whole)[start:start + rows[me]]
        sent += (rows[me] * cols * (world - 1) + (sum(rows) - rows[me]) * cols) * WIRE.itemsize
    return sent


def worker(steps: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_gradpower as gp
    from hf_gradpower import muon

    dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)

    def build():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, gp.build_optimizer(model, "muonpower", lr=1e-3, weight_decay=0.1)

    routes = {"owner (all-to-all)": build(), "gather every matrix": build()}
    route_fns = {"owner (all-to-all)": muon.orthogonalise_sharded, "gather every matrix": gather_everywhere}
    times = {name: [] for name in routes}
    comm = {name: 0 for name in routes}
    g = torch.Generator().manual_seed(me)
    for step in range(steps + 2):
        batch = torch.randint(0, config.vocab_size, (2, 64), generator=g)
        order = list(routes) if step % 2 == 0 else list(reversed(routes))
        for name in order:
            model, opt = routes[name]
            model(input_ids=batch, labels=batch).loss.backward()
            muon.orthogonalise_sharded = route_fns[name]
            before = opt.ns_stats.bytes_communicated
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            dist.barrier()
            if step >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - start)
                comm[name] += opt.ns_stats.bytes_communicated - before
            opt.zero_grad()

    # whole matrices a rank orthogonalised in the last step (measured): the ones it owns, or all of them
    whole = {name: opt.ns_stats.orthogonalised_numel for name, (_, opt) in routes.items()}
    shard_bytes = sum(p.to_local().numel() * 4 for p in routes["owner (all-to-all)"][0].parameters())
    row = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                  "bytes_per_step": comm[name] / steps, "whole_matrix_bytes_bf16": whole[name] * WIRE.itemsize}
           for name, t in times.items()}
    report = {"rank": me, "routes": row, "param_shard_bytes_fp32": shard_bytes,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if me == 0:
        Path(out).write_text(json.dumps({"world": world, "ranks": gathered}, indent=1))
    dist.destroy_process_group()


def launch(procs: int, steps: int, out: Path) -> dict:
    target = out / f".sharded_{procs}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
           str(29700 + procs), "-m", "benchmarks.sharded", "--worker", "--steps", str(steps), "--target", str(target)]
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(target.read_text())
    target.unlink()
    return result


def markdown(results: list[dict], steps: int) -> str:
    lines = [
        "# Sharded MuonPower (FSDP2, gloo, CPU): owner route vs gathering every matrix",
        "",
        f"CPU: {cpu_name()}; torch {torch.__version__}; one thread per process; load average "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share the machine). LLaMA 4 layers, hidden 256, "
        f"MLP 704 ({steps} timed steps after 2 warm-up, routes alternated step by step on the same gradients; "
        "the machine is shared, so spread is wide). Step time: median [min, max] of rank 0's `opt.step()` "
        "between barriers. Bytes: bf16 sent + received by one rank for Newton-Schulz per step (rank 0). "
        "Whole matrices: bf16 bytes of full matrices a rank assembles (max over ranks).",
        "",
        "| processes | route | step ms (median [min, max]) | bytes / step / rank | whole matrices / rank "
        "| param shards / rank | peak RSS / rank (MiB, max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        ranks = res["ranks"]
        for name, r in ranks[0]["routes"].items():
            whole = max(rk["routes"][name]["whole_matrix_bytes_bf16"] for rk in ranks)
            lines.append(
                f"| {res['world']} | {name} | {r['median_ms']:.1f} [{r['min_ms']:.1f}, {r['max_ms']:.1f}] "
                f"| {r['bytes_per_step'] / 2**10:,.0f} KiB | {whole / 2**10:,.0f} KiB "
                f"| {ranks[0]['param_shard_bytes_fp32'] / 2**10:,.0f} KiB "
                f"| {max(rk['peak_rss_mib'] for rk in ranks):.0f} (both routes in one process) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.target)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = [launch(n, args.steps, args.out) for n in args.procs]
    (args.out / "sharded_cpu.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args.steps)
    (args.out / "sharded_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
