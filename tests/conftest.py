"""Shared fixtures: tiny models built from configs (nothing is downloaded), synthetic token data, and Triton's
interpreter."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def tiny_qwen2moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, use_sliding_window=False,
        output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False,
    )
    return Qwen2MoeForCausalLM(config)


def patterned_tokens(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Learnable sequences: each row counts up from a random start with a random stride (mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(seq)) % VOCAB


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def qwen2moe():
    return tiny_qwen2moe()


@pytest.fixture
def cpu_mesh(tmp_path):
    """A one-process gloo group (file rendezvous: no port to collide with) and its 1-rank CPU DeviceMesh."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh

    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        if initialized_here:
            dist.destroy_process_group()


TRITON_JIT = "hf_gradpower.kernels._triton_jit"


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for this test only: CPU tensors take the Triton backend, its kernels interpreted.
    The backend choices start afresh (each combination self-checks again) and are forgotten afterwards."""
    from hf_gradpower.kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = sys.modules.pop(TRITON_JIT, None)
    importlib.import_module(TRITON_JIT)  # @triton.jit reads TRITON_INTERPRET when the kernels are defined
    dispatch.reset()
    yield
    dispatch.reset()
    sys.modules.pop(TRITON_JIT, None)
    if previous is not None:
        sys.modules[TRITON_JIT] = previous
