"""GradPower in a plain PyTorch training loop (nanoGPT-style), in the paper's order: power, then clip.

    python examples/plain_loop.py                      # a small GPT on the C4 sample shipped with the package
    python examples/plain_loop.py --steps 500 --p 1.2 --device cuda

``gp.attach`` turns the AdamW you already have into AdamPower (a step pre-hook applies phi_p to every
gradient); ``gp.apply_now`` applies it right after backward instead, so that clipping sees phi_p(g) as in
Algorithm 1 of the paper, and the hook then skips that step.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import hf_gradpower as gp
from hf_gradpower.data import build_datasets, load_tokenizer


class GPT(nn.Module):
    """A minimal decoder-only transformer: token + position embeddings, pre-norm blocks, a tied head."""

    def __init__(self, vocab: int, seq_len: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.mask = nn.Transformer.generate_square_subsequent_mask(seq_len)
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)  # small logits at the start, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        x = self.blocks(x, mask=self.mask[:n, :n].to(ids.device), is_causal=True)
        return self.norm(x) @ self.tok.weight.T


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--p", type=float, default=gp.DEFAULT_POWER, help="GradPower exponent (1 is plain AdamW)")
    ap.add_argument("--max_grad_norm", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    tokenizer = load_tokenizer("embedded")  # the 4096-token BPE trained on the shipped C4 sample
    train, _ = build_datasets("embedded", tokenizer, args.seq_len, eval_fraction=None)
    blocks = torch.tensor(train["input_ids"])
    model = GPT(len(tokenizer), args.seq_len).to(args.device)
    optimizer = gp.attach(
        torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1), p=args.p
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps))
    )

    losses = []
    for step in range(args.steps):
        batch = blocks[torch.randint(len(blocks), (args.batch_size,))].to(args.device)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        gp.apply_now(optimizer)  # phi_p(g) now ...
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # ... then clip it
        optimizer.step()  # the hook knows phi already ran this step
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
