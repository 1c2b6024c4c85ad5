"""MuonAdamW / MuonPower against torch.optim.Muon + torch.optim.AdamW on the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import patterned_tokens, tiny_llama, tiny_qwen2moe

import hf_gradpower as gp
from hf_gradpower.optimizers import muon_parameter_names, param_groups

MUON_KW = dict(momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")


def batches(steps, seed=0):
    return patterned_tokens(steps * 4, 12, seed=seed).view(steps, 4, 12)


def train(model, step_fn, steps=20):
    losses = []
    for batch in batches(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        step_fn()
        model.zero_grad()
        losses.append(loss.item())
    return losses


def torch_reference_optimizers(model, lr, wd):
    """torch.optim.Muon on the hidden 2-D matrices, torch.optim.AdamW on the rest (Trainer-style decay)."""
    muon_names = muon_parameter_names(model)
    named = dict(model.named_parameters())
    muon = torch.optim.Muon([named[n] for n in named if n in muon_names], lr=lr, weight_decay=wd, **MUON_KW)
    rest = [(n, p) for n, p in named.items() if n not in muon_names]
    adamw = torch.optim.AdamW(
        [{"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": wd},
         {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=True,
    )
    return muon, adamw


def test_muon_equals_torch_muon_plus_adamw_bit_for_bit(monkeypatch):
    # torch's own Newton-Schulz route, also on CPUs without bf16 GEMMs (which take the fp32-GEMM route)
    monkeypatch.setattr("hf_gradpower.muon._cpu_has_bf16_gemm", lambda: True)
    ours, ref = tiny_llama(), tiny_llama()
    opt = gp.build_optimizer(ours, "muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    muon, adamw = torch_reference_optimizers(ref, lr=3e-3, wd=0.1)
    losses = train(ours, opt.step)
    ref_losses = train(ref, lambda: (muon.step(), adamw.step()))
    assert losses == ref_losses
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert losses[-1] < losses[0]


def test_muonpower_with_p_one_is_bit_identical_to_muon():
    a, b = tiny_qwen2moe(), tiny_qwen2moe()
    opt_a = gp.build_optimizer(a, "muon", lr=3e-3, weight_decay=0.1)
    opt_b = gp.build_optimizer(b, "muonpower", lr=3e-3, weight_decay=0.1, p=1.0)
    assert train(a, opt_a.step) == train(b, opt_b.step)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)


def test_muonpower_on_moe_experts_equals_per_expert_torch_muon():
    """Each expert's gate, up and down matrices, orthogonalised on its own by torch.optim.Muon."""
    model = tiny_qwen2moe()
    lr, wd, p = 1e-2, 0.1, 1.2
    opt = gp.build_optimizer(model, "muonpower", lr=lr, weight_decay=wd, p=p)
    experts = {n: q for n, q in model.named_parameters() if ".experts." in n}
    start = {n: q.detach().clone() for n, q in experts.items()}

    # reference: one leaf 2-D parameter per expert matrix, fed phi(grad) of its slice, two steps
    leaves, refs = {}, []
    for n, w in start.items():
        parts = [w[e] for e in range(w.shape[0])]
        if n.endswith("gate_up_proj"):
            parts = [half for m in parts for half in m.chunk(2, dim=0)]
        leaves[n] = [torch.nn.Parameter(m.clone()) for m in parts]
        refs.extend(leaves[n])
    ref_opt = torch.optim.Muon(refs, lr=lr, weight_decay=wd, **MUON_KW)

    for batch in batches(2):
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        for n, w in experts.items():
            grads = [w.grad[e] for e in range(w.shape[0])]
            if n.endswith("gate_up_proj"):
                grads = [half for g in grads for half in g.chunk(2, dim=0)]
            for leaf, g in zip(leaves[n], grads, strict=True):
                leaf.grad = gp.sign_power(g, p)
        opt.step()
        ref_opt.step()
        model.zero_grad()

    for n, w in experts.items():
        got = [w[e] for e in range(w.shape[0])]
        if n.endswith("gate_up_proj"):
            got = [half for m in got for half in m.chunk(2, dim=0)]
        for g, leaf in zip(got, leaves[n], strict=True):
            # batched bf16 Newton-Schulz vs torch's per-matrix one: bf16 rounding of a update of size lr
            torch.testing.assert_close(g, leaf.detach(), rtol=0, atol=lr * 2e-2)
        moved = (w.detach() - start[n]).abs().max().item()
        assert moved > lr * 0.1  # the experts did move: the comparison is not trivially true


@pytest.mark.parametrize("shape", [(3, 48, 16), (3, 16, 48), (2, 32, 32), (2, 8, 40), (1, 40, 8)],
                         ids=["mixtral-like gate_up [E,2I,H] I>H", "down [E,H,I] I>H", "square", "wide", "tall"])
@pytest.mark.parametrize("split", [1, 2])
def test_expert_stacks_of_any_shape_equal_torch_muon_on_each_slice(shape, split):
    """[E, rows, cols] with rows > cols and rows < cols, any split: each 2-D slice is torch.optim.Muon's update."""
    lr, wd, steps = 1e-2, 0.1, 3
    g = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(shape, generator=g))
    slices = [m.clone() for e in stack.detach() for m in e.chunk(split, dim=0)]
    leaves = [torch.nn.Parameter(m.clone()) for m in slices]
    opt = gp.MuonAdamW([{"params": [stack], "use_muon": True, "ns_split": split}], lr=lr, weight_decay=wd, **MUON_KW)
    ref = torch.optim.Muon(leaves, lr=lr, weight_decay=wd, **MUON_KW)
    for _ in range(steps):
        grad = torch.randn(shape, generator=g)
        stack.grad = grad.clone()
        for leaf, gs in zip(leaves, [m for e in grad for m in e.chunk(split, dim=0)], strict=True):
            leaf.grad = gs.clone()
        opt.step()
        ref.step()
    got = [m for e in stack.detach() for m in e.chunk(split, dim=0)]
    for a, b, start in zip(got, leaves, slices, strict=True):
        # batched vs per-matrix bf16 Newton-Schulz: bf16 rounding of an update of size lr per step
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=steps * lr * 2e-2)
        assert (a - start).abs().max() > lr * 0.1  # moved: the comparison is not trivially true


def test_orthogonalising_gate_and_up_together_would_differ():
    """Splitting matters: NS of the stacked [2I, H] matrix is not NS of each half."""
    from torch.optim._muon import _zeropower_via_newtonschulz as ns

    g = torch.randn(16, 8)
    coeffs = (3.4445, -4.7750, 2.0315)
    joint = ns(g, coeffs, 5, 1e-7)
    halves = torch.cat([ns(h, coeffs, 5, 1e-7) for h in g.chunk(2, dim=0)])
    assert (joint.float() - halves.float()).abs().max() > 0.05


def test_routing_puts_every_parameter_in_exactly_one_group(qwen2moe):
    groups = param_groups(qwen2moe, weight_decay=0.1, route_muon=True)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in qwen2moe.named_parameters())
    muon = {n for g in groups if g["use_muon"] for n in g["param_names"]}
    assert "model.embed_tokens.weight" not in muon and "lm_head.weight" not in muon
    assert not any(n.endswith("mlp.gate.weight") or "shared_expert_gate" in n or "norm" in n for n in muon)
    assert not any(n.endswith(".bias") for n in muon)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.down_proj",
            "model.layers.1.mlp.shared_expert.up_proj.weight"} <= muon
    split = {n for g in groups if g.get("ns_split") == 2 for n in g["param_names"]}
    assert split == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert all(qwen2moe.get_parameter(n).ndim < 2 for n in no_decay)


def test_routing_summary_is_logged(llama, caplog):
    with caplog.at_level("INFO", logger="hf_gradpower.optimizers"):
        gp.build_optimizer(llama, "muonpower", lr=1e-3)
    line = next(r.message for r in caplog.records if r.message.startswith("Muon:"))
    muon_count = sum(p.numel() for n, p in llama.named_parameters() if n in muon_parameter_names(llama))
    assert f"{muon_count:,} parameters | AdamW" in line


def test_muon_state_dict_roundtrip_resumes_identically():
    model = tiny_qwen2moe()
    opt = gp.build_optimizer(model, "muonpower", lr=3e-3, weight_decay=0.1)
    train(model, opt.step, steps=3)
    twin = copy.deepcopy(model)
    twin_opt = gp.build_optimizer(twin, "muonpower", lr=3e-3, weight_decay=0.1, p=1.5)  # p comes from the checkpoint
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert gp.gradpower_p(twin_opt) == 1.2
    assert train(model, opt.step, steps=3) == train(twin, twin_opt.step, steps=3)


def test_muon_refuses_flattened_or_sharded_parameters():
    with pytest.raises(ValueError, match="flattened by FSDP1/ZeRO.*use FSDP2"):
        gp.MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(10))], "use_muon": True}])
    opt = gp.MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "use_muon": True}])
    opt.param_groups[0]["params"] = [torch.nn.Parameter(torch.zeros(16))]  # what ZeRO's flattening does
    opt.param_groups[0]["params"][0].grad = torch.ones(16)
    with pytest.raises(ValueError, match="flattened .ZeRO, FSDP1.*use FSDP2"):
        opt.step()


def test_muon_needs_the_model():
    with pytest.raises(ValueError, match="needs the model"):
        gp.build_optimizer(tiny_llama().parameters(), "muon", lr=1e-3)


def _newton_schulz_float64(g: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    """The same quintic iteration in float64: the reference both bf16 routes are measured against."""
    a, b, c = coefficients
    x = g.double().mT if g.size(-2) > g.size(-1) else g.double()
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if g.size(-2) > g.size(-1) else x


@pytest.mark.parametrize("shape", [(96, 48), (40, 112), (64, 64), (3, 48, 16), (2, 16, 40)])
def test_newton_schulz_in_fp32_gemms_is_bf16_newton_schulz(shape):
    """The fp32-GEMM route (CPUs without bf16 GEMMs) is torch's bf16 iteration: as far from float64 as torch's
    route, far closer to torch's route than that, and not an fp32 iteration (which would be ~1e-6 from float64)."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

    from hf_gradpower.muon import _zeropower_via_newtonschulz_batched

    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = _zeropower_via_newtonschulz_batched(g, coefficients, 5, EPS, fp32_gemms=True)
    theirs = torch.stack([torch_ns(m, coefficients, 5, EPS) for m in g]) if g.ndim == 3 else torch_ns(
        g, coefficients, 5, EPS)
    exact = _newton_schulz_float64(g, coefficients, 5)

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm()).item()

    assert ours.dtype == torch.bfloat16 and ours.shape == g.shape
    torch_error, our_error = rel(theirs, exact), rel(ours, exact)
    assert 3e-3 < torch_error < 3e-2  # bf16 rounding through five iterations
    assert 0.8 * torch_error < our_error < 1.25 * torch_error
    assert rel(ours, theirs) < 0.35 * torch_error


def test_muon_on_cpu_routes_stay_within_bf16_noise_of_torch_muon():
    """Whichever Newton-Schulz route this CPU takes, 20 training steps track torch.optim.Muon's closely."""
    ours, ref = tiny_llama(), tiny_llama()
    start = [q.detach().clone() for q in ours.parameters()]
    opt = gp.build_optimizer(ours, "muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    losses = train(ours, opt.step)
    muon, adamw = torch_reference_optimizers(ref, lr=3e-3, wd=0.1)
    ref_losses = train(ref, lambda: (muon.step(), adamw.step()))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 2e-4 * ref_losses[0]
    for a, b, s in zip(ours.parameters(), ref.parameters(), start, strict=True):
        assert (a - b).abs().max() < 0.05 * (b - s).abs().max() + 1e-6
