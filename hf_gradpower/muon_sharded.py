"""Newton-Schulz for Muon when parameters are sharded (FSDP2) or replicated (DDP): one owner per matrix.

Newton-Schulz needs the whole matrix (on a row shard it is simply wrong), but every rank doing every
matrix wastes N-fold work and memory. As in Dion, torchtitan and Megatron's layer-sharded Muon, each
matrix gets an owner rank (greedy, largest first, onto the least-loaded rank), so each rank
orthogonalises ~1/N of the work:

* FSDP2 ``DTensor`` 2-D matrices (``Shard(0)``): one ``all_to_all`` brings every row shard of a matrix
  to its owner, the owner runs Newton-Schulz on the full matrix, a second ``all_to_all`` sends each rank
  back its rows. A rank holds its shards plus the matrices it owns, never the whole model.
* FSDP2 ``DTensor`` 3-D expert stacks ``[E, rows, cols]`` sharded on the expert dim: every rank already
  holds whole experts, and Newton-Schulz runs per expert, so each rank orthogonalises its own experts with
  no communication at all (the split of the work is FSDP's split of the experts).
* Replicated plain tensors under DDP (opt-in): each rank orthogonalises the matrices it owns, then one
  ``all_gather`` gives every rank all the results.

Everything travels in bf16: Newton-Schulz casts its input to bf16 first and returns bf16, so the
communicated bytes are halved and the result is bit-identical to orthogonalising on one process.
Momentum and the elementwise parts (phi, weight decay, the update) stay on each rank's own shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

WIRE_DTYPE = torch.bfloat16  # Newton-Schulz's own input/output precision


@dataclass
class NewtonSchulzStats:
    """What this rank's Newton-Schulz cost: checks that work is split and no rank assembles the whole model."""

    bytes_communicated: int = 0  # bf16 bytes sent + received by this rank since construction
    orthogonalised_numel: int = 0  # elements of the whole matrices this rank orthogonalised in the last step

    def counting(self, orthogonalise: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(full: torch.Tensor) -> torch.Tensor:
            self.orthogonalised_numel += full.numel()
            return orthogonalise(full)

        return run


@dataclass
class MatrixJob:
    """One parameter's Newton-Schulz: its global shape, this rank's local update, the function to run."""

    global_shape: tuple[int, ...]
    local_update: torch.Tensor  # this rank's rows (FSDP2) or the whole tensor (DDP)
    orthogonalise: Callable[[torch.Tensor], torch.Tensor]  # full tensor -> full bf16 result, same shape
    result: torch.Tensor | None = None  # this rank's rows of the result, filled by the functions below


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def check_shardable(param: torch.Tensor) -> None:
    """One line naming the problem if a DTensor parameter's layout is not one this module handles."""
    if not is_dtensor(param):
        return
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(
            f"sharded Muon handles 1-D meshes with Shard(0) or Replicate parameters (FSDP2's fully_shard); got "
            f"placements {placements} on a {param.device_mesh.ndim}-D mesh. Use fully_shard on one mesh dimension."
        )
    if isinstance(placements[0], Shard) and placements[0].dim != 0:
        raise ValueError(
            f"sharded Muon needs rows sharded (Shard(0)), got {placements[0]}; use fully_shard's default placement."
        )


def row_counts(rows: int, world: int) -> list[int]:
    """Rows each rank holds under ``Shard(0)``: ``torch.chunk`` sizes (FSDP2's and DTensor's), padded with 0."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank per matrix, balanced by size: largest first onto the least-loaded rank (ties: lowest rank)."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


def orthogonalise_sharded(jobs: list[MatrixJob], group=None) -> int:
    """Fill ``job.result`` for FSDP2 ``Shard(0)`` 2-D jobs by owner (two all-to-alls); returns bytes sent."""
    if not jobs:
        return 0
    world, me = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_owners([_numel(j.global_shape) for j in jobs], world)
    counts = [row_counts(j.global_shape[0], world) for j in jobs]
    for job, rows in zip(jobs, counts, strict=True):
        if job.local_update.shape[0] != rows[me]:
            raise ValueError(
                f"rank {me} holds {job.local_update.shape[0]} rows of a {job.global_shape} matrix, expected "
                f"{rows[me]} (torch.chunk layout); sharded Muon supports FSDP2's even Shard(0) layout only."
            )
    cols = [_numel(j.global_shape[1:]) for j in jobs]
    mine = [i for i, o in enumerate(owners) if o == me]

    # 1) every rank sends each owner its rows of the owner's matrices
    send = [jobs[i].local_update.reshape(-1).to(WIRE_DTYPE) for r in range(world) for i in _owned(owners, r)]
    in_splits = [sum(counts[i][me] * cols[i] for i in _owned(owners, r)) for r in range(world)]
    out_splits = [sum(counts[i][r] * cols[i] for i in mine) for r in range(world)]
    device = jobs[0].local_update.device
    gathered = _all_to_all(send, in_splits, out_splits, group, device)

    # 2) the owner assembles each full matrix (pieces arrive ordered by source rank) and orthogonalises it
    offset, pieces = 0, {i: [] for i in mine}
    for r in range(world):
        for i in mine:
            n = counts[i][r] * cols[i]
            pieces[i].append(gathered[offset:offset + n])
            offset += n
    results = {
        i: jobs[i].orthogonalise(torch.cat(pieces[i]).view(jobs[i].global_shape)).to(WIRE_DTYPE) for i in mine
    }

    # 3) the owner sends each rank its rows of the result
    starts = [[sum(c[:r]) for r in range(world)] for c in counts]
    back = [results[i][starts[i][r]:starts[i][r] + counts[i][r]].reshape(-1) for r in range(world) for i in mine]
    returned = _all_to_all(back, out_splits, in_splits, group, device)
    offset = 0
    for r in range(world):
        for i in _owned(owners, r):
            n = counts[i][me] * cols[i]
            jobs[i].result = returned[offset:offset + n].view(jobs[i].local_update.shape)
            offset += n
    return (sum(in_splits) - in_splits[me] + sum(out_splits) - out_splits[me]) * WIRE_DTYPE.itemsize


def orthogonalise_replicated(jobs: list[MatrixJob], group=None) -> int:
    """Fill ``job.result`` for replicated (DDP) jobs: each rank does its share, one all_gather; returns bytes sent."""
    if not jobs:
        return 0
    world, me = dist.get_world_size(group), dist.get_rank(group)
    owners = assign_owners([j.local_update.numel() for j in jobs], world)
    loads = [sum(jobs[i].local_update.numel() for i in _owned(owners, r)) for r in range(world)]
    width = max(loads)
    mine = [jobs[i].orthogonalise(jobs[i].local_update).to(WIRE_DTYPE).reshape(-1) for i in _owned(owners, me)]
    packed = torch.zeros(width, dtype=WIRE_DTYPE, device=jobs[0].local_update.device)
    if mine:
        packed[:loads[me]] = torch.cat(mine)
    everyone = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(everyone, packed, group=group)
    for r in range(world):
        offset = 0
        for i in _owned(owners, r):
            n = jobs[i].local_update.numel()
            jobs[i].result = everyone[r][offset:offset + n].view(jobs[i].local_update.shape)
            offset += n
    return width * WIRE_DTYPE.itemsize * (world - 1)


def _owned(owners: list[int], rank: int) -> list[int]:
    return [i for i, o in enumerate(owners) if o == rank]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _all_to_all(chunks: list[torch.Tensor], in_splits: list[int], out_splits: list[int], group, device) -> torch.Tensor:
    send = torch.cat(chunks) if chunks else torch.empty(0, dtype=WIRE_DTYPE, device=device)
    received = torch.empty(sum(out_splits), dtype=WIRE_DTYPE, device=device)
    dist.all_to_all_single(received, send, out_splits, in_splits, group=group)
    return received
