"""checkpoints.py on files written by safetensors / torch.save themselves, intact and truncated."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_gradpower.checkpoints import (
    checkpoint_problem,
    choose_output_dir,
    latest_checkpoint,
    make_writable,
    resolve_resume,
)


def make_checkpoint(folder, step: int):
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(64)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 64)}}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def truncate(path, keep: float = 0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_intact_checkpoint_has_no_problem(tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    assert checkpoint_problem(ckpt) is None
    assert load_file(str(ckpt / "model.safetensors"))["w"].shape == (64, 64)  # and the loaders agree


@pytest.mark.parametrize("name, keep, why", [
    ("model.safetensors", 0.6, "model.safetensors is truncated"),
    ("model.safetensors", 0.00001, "model.safetensors is truncated"),
    ("optimizer.pt", 0.6, "optimizer.pt is truncated"),
    ("scheduler.pt", 0.9, "scheduler.pt is truncated"),
    ("trainer_state.json", 0.5, "trainer_state.json"),
])
def test_truncated_files_are_found_and_the_loaders_agree(tmp_path, name, keep, why):
    ckpt = make_checkpoint(tmp_path, 5)
    truncate(ckpt / name, keep)
    assert why in checkpoint_problem(ckpt)
    loader = {".safetensors": lambda p: load_file(str(p)), ".pt": torch.load, ".json": lambda p: json.loads(
        p.read_text())}[(ckpt / name).suffix]
    with pytest.raises(Exception):  # noqa: B017 - the library's own loader fails on it too
        loader(ckpt / name)


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt"])
def test_resume_latest_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog, broken):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    truncate(tmp_path / "checkpoint-6" / broken)
    with caplog.at_level(logging.INFO, logger="hf_gradpower.checkpoints"):
        assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-4")
        assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-4")
    assert f"skipping {tmp_path / 'checkpoint-6'}: {broken} is truncated" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-4'}" in caplog.text


def test_resume_requests(tmp_path):
    assert resolve_resume(None, tmp_path) is None and resolve_resume("false", tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    ckpt = make_checkpoint(tmp_path, 3)
    assert resolve_resume(str(ckpt), tmp_path) == str(ckpt)
    truncate(ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="cannot resume from it.*optimizer.pt is truncated"):
        resolve_resume(str(ckpt), tmp_path)
    assert latest_checkpoint(tmp_path) is None


def test_output_folder_rules(tmp_path):
    out = tmp_path / "run"
    assert choose_output_dir(str(out), resuming=False, overwrite=False, rename=False) == str(out)  # new
    make_checkpoint(out, 10)
    with pytest.raises(ValueError, match="holds an earlier run \\(checkpoint-10\\)"):
        choose_output_dir(str(out), resuming=False, overwrite=False, rename=False)
    assert choose_output_dir(str(out), resuming=True, overwrite=False, rename=False) == str(out)
    assert choose_output_dir(str(out), resuming=False, overwrite=False, rename=True) == f"{out}-2"
    assert choose_output_dir(str(out), resuming=False, overwrite=True, rename=False) == str(out)
    make_writable(str(out), overwrite=True)
    assert latest_checkpoint(out) is None and out.is_dir()  # the earlier run's checkpoints cannot be resumed


def test_a_file_where_a_checkpoint_goes_or_an_unwritable_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-10").write_text("in the way")
    with pytest.raises(ValueError, match="checkpoint-10 is a file where a checkpoint folder goes"):
        choose_output_dir(str(out), resuming=False, overwrite=True, rename=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot be written"):
        make_writable(str(blocker / "run"), overwrite=False)
    with pytest.raises(ValueError, match="is a file"):
        choose_output_dir(str(blocker), resuming=False, overwrite=False, rename=False)
