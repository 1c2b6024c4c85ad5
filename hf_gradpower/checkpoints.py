"""A run's folder on disk: which checkpoint a resume starts from, and whether a new run may write there.

Trainer writes a checkpoint in place (weights, optimizer, scheduler, RNG state, ``trainer_state.json``
last), so a process killed mid-save, a full disk or a copy cut short leaves a newest folder that Trainer's
loader fails on. :func:`latest_checkpoint` checks each file's integrity from its metadata (safetensors
header against the file size; the zip directory of ``torch.save`` files; ``trainer_state.json`` as JSON)
without loading tensors, and falls back to the newest readable checkpoint. :func:`choose_output_dir` keeps
a new run from overwriting a finished one or mixing its checkpoints with another run's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Files a run leaves in its output folder (weights, run facts, metrics): their presence means "a run was here".
RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "gradpower.json",
             "metrics.json")
_LATEST = ("latest", "true")


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` entries of ``output_dir`` (folders or not), newest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is truncated (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path):  # torch.save writes a zip; truncation loses its directory (at the end)
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or not a torch.save file"


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (one phrase), or None when every file in it is intact."""
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        return f"{ckpt.name} is not a folder"
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or truncated (interrupted while saving)"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    for path in sorted(ckpt.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(path)
        else:
            continue
        if problem:
            return problem
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint in ``output_dir`` whose files are all intact; a warning for each one skipped."""
    for ckpt in checkpoints(output_dir):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        logger.warning("skipping %s: %s; trying the previous checkpoint", ckpt, problem)
    return None


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder a run resumes from: ``True``/``"latest"`` -> the newest readable one in
    ``output_dir``; a path -> itself, checked; ``None``/``False``/``"false"`` -> None (a fresh start).

    Raises ``ValueError`` (one line, with the fix) when there is nothing readable to resume from.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false")):
        return None
    if resume is True or str(resume).lower() in _LATEST:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {output_dir} "
                             "(one with every file readable); start without --resume_from_checkpoint, or pass the "
                             "--output_dir of the run to continue")
    else:
        found = str(resume)
        problem = checkpoint_problem(found) if Path(found).exists() else "it does not exist"
        if problem:
            raise ValueError(f"--resume_from_checkpoint {resume}: cannot resume from it ({problem}); pass a "
                             "complete checkpoint folder or 'latest'")
    logger.info("resuming from %s", found)
    return found


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Names of what an earlier run left in ``output_dir`` (its checkpoints, weights, run facts), or []."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return [p.name for p in checkpoints(folder)] + [name for name in RUN_FILES if (folder / name).exists()]


def choose_output_dir(output_dir: str, *, resuming: bool, overwrite: bool, rename: bool) -> str:
    """The folder a run writes to; refuses (``ValueError``) to overwrite or mix with an earlier run.

    A fresh run into a folder an earlier run used is refused with the three ways out, unless ``overwrite``
    (that run's checkpoints are then removed by :func:`make_writable`, so a later resume cannot pick them)
    or ``rename`` (the default folder name: the next free ``<name>-2``, ``-3``, ... is used). Read-only:
    nothing is created here.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; pass a folder path")
    blocked = [p.name for p in checkpoints(path) if not p.is_dir()]
    if blocked:
        raise ValueError(f"{path / blocked[0]} is a file where a checkpoint folder goes; remove it or pass "
                         "another --output_dir")
    found = earlier_run(path)
    if resuming or overwrite or not found:
        return output_dir
    if rename:
        n = 2
        while earlier_run(f"{output_dir}-{n}") or Path(f"{output_dir}-{n}").is_file():
            n += 1
        logger.warning("%s holds an earlier run (%s); this run writes to %s-%d", output_dir, found[0], output_dir, n)
        return f"{output_dir}-{n}"
    raise ValueError(f"--output_dir {output_dir} holds an earlier run ({', '.join(found[:3])}); pass a new "
                     "--output_dir, --overwrite_output_dir to replace it, or --resume_from_checkpoint latest "
                     "to continue it")


def make_writable(output_dir: str, *, overwrite: bool, main_process: bool = True) -> None:
    """Create ``output_dir`` and prove it takes a file, before any training; with ``overwrite`` the main
    process removes an earlier run's checkpoints (its other files are replaced when this run saves)."""
    path = Path(output_dir)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--output_dir {output_dir} cannot be written ({exc.strerror or exc}); pass a "
                         "writable folder") from None
    if overwrite and main_process:
        for ckpt in checkpoints(path):
            logger.warning("--overwrite_output_dir: removing the earlier run's %s", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
