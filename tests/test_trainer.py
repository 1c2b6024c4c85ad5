"""GradPowerTrainer: trains with every optimizer, resumes exactly, clips in the chosen order, refuses misuse."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import patterned_tokens, tiny_llama, tiny_qwen2moe
from transformers import HfArgumentParser, Trainer, TrainingArguments

import hf_gradpower as gp
from hf_gradpower.trainer import GradPowerTrainer, GradPowerTrainingArguments, optimizer_cls_and_kwargs


def dataset(n=64, seq=16, seed=0):
    rows = patterned_tokens(n, seq, seed=seed)
    return [{"input_ids": r, "labels": r} for r in rows]


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=30,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        lr_scheduler_type="constant", adam_beta2=0.95, weight_decay=0.1, disable_tqdm=True,
    )
    base.update(kw)
    return GradPowerTrainingArguments(**base)


def train_losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2moe], ids=["llama", "qwen2moe"])
@pytest.mark.parametrize("optim", ["adamw", "adampower", "muon", "muonpower"])
def test_trainer_loss_falls_with_each_optimizer(tmp_path, make_model, optim):
    trainer = GradPowerTrainer(model=make_model(), args=make_args(tmp_path, optim=optim), train_dataset=dataset())
    losses = train_losses(trainer)
    assert losses[-1] < 0.8 * losses[0]
    opt = trainer.optimizer.optimizer  # inside Accelerate's wrapper
    assert gp.gradpower_p(opt) == (1.2 if optim.endswith("power") else None)
    assert isinstance(opt, gp.MuonAdamW) == optim.startswith("muon")


def test_resume_from_checkpoint_reproduces_the_uninterrupted_losses(tmp_path):
    kw = dict(optim="adampower", gradpower_p=1.3, max_steps=10, logging_steps=1, save_strategy="steps",
              save_steps=5, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=0.5)
    full = GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path, **kw), train_dataset=dataset())
    full_losses = train_losses(full)

    resumed = GradPowerTrainer(
        model=tiny_llama(seed=1), args=make_args(tmp_path / "b", **{**kw, "gradpower_p": 1.2}), train_dataset=dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 5]
    assert resumed_losses == pytest.approx(full_losses[5:], rel=1e-6, abs=0)
    assert gp.gradpower_p(resumed.optimizer) == 1.3  # p came back from the checkpoint


def test_adamw_run_resumed_from_an_adampower_checkpoint_stays_adamw(tmp_path):
    kw = dict(max_steps=8, logging_steps=1, save_strategy="steps", save_steps=4, max_grad_norm=0.5)
    GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path, optim="adampower", **kw), train_dataset=dataset()).train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert {g["gradpower_p"] for g in saved["param_groups"]} == {1.2}
    stripped = tmp_path / "stripped"
    shutil.copytree(checkpoint, stripped)
    for group in saved["param_groups"]:
        del group["gradpower_p"]
    torch.save(saved, stripped / "optimizer.pt")

    def resumed_losses(name, start):
        trainer = GradPowerTrainer(model=tiny_llama(seed=1), args=make_args(tmp_path / name, optim="adamw", **kw),
                                   train_dataset=dataset())
        trainer.train(resume_from_checkpoint=str(start))
        assert gp.gradpower_p(trainer.optimizer) is None
        return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 4]

    # phi would change every update after the resume; the baseline must equal a resume that never saw p
    assert resumed_losses("a", checkpoint) == resumed_losses("b", stripped)


def test_an_fsdp_launch_that_accelerate_runs_unsharded_is_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp2.yaml` sets
    with caplog.at_level("WARNING", logger="hf_gradpower.trainer"):
        trainer = GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=dataset())
    assert not trainer.is_fsdp_enabled
    assert any("not sharded" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("order", ["before_clip", "after_clip"])
def test_clipping_order(tmp_path, order):
    """One SGD step: before_clip gives lr * clip(phi(g)), after_clip gives lr * phi(clip(g))."""
    lr, p, max_norm = 0.1, 1.5, 0.05
    model, ref = tiny_llama(), tiny_llama()
    data = dataset(n=8)
    args = make_args(tmp_path, optim="sgdpower", gradpower_p=p, gradpower_order=order, learning_rate=lr,
                     max_steps=1, max_grad_norm=max_norm, weight_decay=0.0)
    GradPowerTrainer(model=model, args=args, train_dataset=data).train()

    batch = torch.stack([d["input_ids"] for d in data])
    ref(input_ids=batch, labels=batch).loss.backward()
    grads = [q.grad for q in ref.parameters()]

    def clipped(gs):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        return [g * min(1.0, max_norm / (norm.item() + 1e-6)) for g in gs]

    def phi(gs):
        return [gp.sign_power(g, p) for g in gs]

    update = clipped(phi(grads)) if order == "before_clip" else phi(clipped(grads))
    other = phi(clipped(grads)) if order == "before_clip" else clipped(phi(grads))
    for got, w, u in zip(model.parameters(), ref.parameters(), update, strict=True):
        torch.testing.assert_close(got.detach(), w.detach() - lr * u, rtol=1e-5, atol=1e-7)
    gap = max((a - b).abs().max().item() for a, b in zip(update, other, strict=True))
    assert lr * gap > 1e-5  # the two orders really differ here


def test_plain_trainer_with_optimizer_cls_and_kwargs_matches_gradpower_trainer(tmp_path):
    args = make_args(tmp_path, optim="adampower", gradpower_order="after_clip", max_steps=10, logging_steps=2)
    ours = train_losses(GradPowerTrainer(model=tiny_llama(), args=args, train_dataset=dataset()))
    plain_args = TrainingArguments(**{k: getattr(args, k) for k in (
        "output_dir", "per_device_train_batch_size", "learning_rate", "max_steps", "logging_steps", "report_to",
        "use_cpu", "seed", "data_seed", "adam_beta2", "weight_decay", "disable_tqdm")}, lr_scheduler_type="constant",
        save_strategy="no")
    plain = Trainer(model=tiny_llama(), args=plain_args, train_dataset=dataset(),
                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("adampower", plain_args, p=1.2))
    assert train_losses(plain) == ours


def test_after_clip_one_pass_adampower_matches_phi_then_torch_adamw(tmp_path, monkeypatch):
    """after_clip: AdamPower's one-pass CPU step inside Trainer == eager phi + torch's AdamW (same run)."""
    kw = dict(optim="adampower", gradpower_order="after_clip", max_steps=8, logging_steps=1, max_grad_norm=0.5,
              lr_scheduler_type="cosine", warmup_steps=2)  # fmt: skip
    one_pass = train_losses(GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path, **kw), train_dataset=dataset()))
    monkeypatch.setenv("HF_GRADPOWER_KERNEL", "eager")  # AdamPower then takes phi (torch ops) + torch AdamW
    reference = train_losses(GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path / "b", **kw), train_dataset=dataset()))
    assert one_pass == pytest.approx(reference, rel=1e-5, abs=0)
    assert one_pass[-1] < one_pass[0]


def test_resume_true_skips_a_half_written_checkpoint(tmp_path):
    kw = dict(optim="adampower", max_steps=10, logging_steps=1, save_strategy="steps", save_steps=5)
    full = train_losses(GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path, **kw), train_dataset=dataset()))
    state = tmp_path / "out" / "checkpoint-10" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while saving checkpoint-10
    resumed = GradPowerTrainer(model=tiny_llama(seed=1), args=make_args(tmp_path, **kw), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    again = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 5]
    assert again == pytest.approx(full[5:], rel=1e-6, abs=0)  # it continued from checkpoint-5
    with pytest.raises(ValueError, match="no complete checkpoint"):
        GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path / "empty", **kw), train_dataset=dataset()).train(
            resume_from_checkpoint=True
        )


def test_a_launch_trainer_would_run_as_independent_copies_is_refused(tmp_path, monkeypatch):
    """WORLD_SIZE=2 (set by accelerate launch / torchrun) but TrainingArguments sees one process."""
    args = make_args(tmp_path, use_cpu=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert args.world_size == 1
    with pytest.raises(ValueError, match="2 processes were launched.*use_cpu=True"):
        GradPowerTrainer(model=tiny_llama(), args=args, train_dataset=dataset())
    monkeypatch.setenv("WORLD_SIZE", "1")
    GradPowerTrainer(model=tiny_llama(), args=args, train_dataset=dataset())  # a single process is fine


def test_arguments_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(GradPowerTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "MuonPower", "--gradpower_p", "1.3", "--use_cpu", "true"]
    )
    assert (args.optim, args.gradpower_p, args.gradpower_order) == ("muonpower", 1.3, "before_clip")
    assert GradPowerTrainingArguments(output_dir=str(tmp_path)).optim == "adampower"
    assert GradPowerTrainingArguments(output_dir=str(tmp_path), optim="adamw_torch").optim == "adamw_torch"


@pytest.mark.parametrize("kw, match", [
    (dict(gradpower_p=0.0), "p=0.0"),
    (dict(gradpower_p=float("nan")), "p=nan"),
    (dict(gradpower_order="sideways"), "gradpower_order"),
    (dict(optim="adampwoer"), "adampwoer"),
])
def test_bad_arguments_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        GradPowerTrainingArguments(output_dir=str(tmp_path), **kw)


def test_deepspeed_optimizer_block_and_zero_muon_are_refused(tmp_path):
    """DeepSpeed needs a GPU here (Accelerate selects it only off CPU): we set the flag Trainer derives from it."""
    trainer = GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path), train_dataset=dataset())
    trainer.is_deepspeed_enabled = True
    trainer.args.hf_deepspeed_config = SimpleNamespace(config={"optimizer": {"type": "AdamW"}})
    with pytest.raises(ValueError, match="'optimizer' block"):
        trainer._check_gradpower_setup()
    trainer.args.hf_deepspeed_config = SimpleNamespace(config={})
    with pytest.raises(ValueError, match="after_clip"):
        trainer._check_gradpower_setup()
    trainer.args.gradpower_order = "after_clip"
    trainer._check_gradpower_setup()  # ZeRO + adampower after clipping is allowed
    trainer.args.optim = "muonpower"
    with pytest.raises(ValueError, match="DeepSpeed ZeRO or FSDP1.*use FSDP2"):
        trainer._check_gradpower_setup()


def test_muon_is_refused_with_fsdp1_and_accepted_with_fsdp2(tmp_path):
    """Accelerate builds its FSDP plugin only with a GPU, so a CPU Trainer cannot take FSDP arguments: we set the
    plugin arguments TrainingArguments derives from ``fsdp_config``. The FSDP2 runs themselves are torch-level
    (test_sharded.py; README "Sharded training")."""
    trainer = GradPowerTrainer(model=tiny_llama(), args=make_args(tmp_path, optim="muonpower"), train_dataset=dataset())
    trainer.args.fsdp_plugin_args = {"fsdp_version": 1}
    with pytest.raises(ValueError, match="DeepSpeed ZeRO or FSDP1.*use FSDP2"):
        trainer._check_gradpower_setup()
    trainer.args.fsdp_plugin_args = {"fsdp_version": 2}
    trainer._check_gradpower_setup()
