"""(Re)generate ``hf_gradpower/resources/model_configs/*.json`` (shipped inside the package) from the GradPower paper's Tables 1-2 (arXiv 2505.24275).

    python configs/make_model_configs.py            # write the JSON files (counts via the meta device)
    python configs/make_model_configs.py --explore  # print the search over readings of the tables

The chosen readings are documented in ``hf_gradpower/model_configs.py`` and in each file's
``_gradpower`` key. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "hf_gradpower" / "resources" / "model_configs"

T5_C4 = {"dataset": "c4", "tokenizer": "T5 (t5-base SentencePiece), vocab 32000 (GaLore / Wortsman setup)",
         "seq_len": 256, "batch_size": 512}
GPT2_OWT = {"dataset": "openwebtext", "tokenizer": "GPT-2 BPE (50257 tokens) padded to 50304",
            "seq_len": 1024, "batch_size": 480}
# T5 tokenizer: pad 0, eos 1, no bos. GPT-2: <|endoftext|> = 50256.
T5_IDS = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1}
GPT2_IDS = {"pad_token_id": None, "bos_token_id": 50256, "eos_token_id": 50256}
TINY_IDS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}

LLAMA_C4_READING = ("Table 1 as printed; SwiGLU intermediate_size = d_ff, vocab 32000, untied lm_head; "
                    "count = all parameters incl. embedding and lm_head.")

LLAMA_01_READING = (
    "Printed (768, 3072, 16, 8) does not add up: 124.7M with vocab 32000 (0.2B row, -38%) and 152.8M with "
    "vocab 50304 (0.25B row, -36%); no vocab / tying / embedding-scope variant fits. The two rows print "
    "identical architectures and differ only in dataset (C4 vs OpenWebText), so the reading is one model "
    "whose size differs by vocabulary only: d_model 1024, d_ff 4096 (= 4 d_model), 16 heads (head_dim 64), "
    "depth 8 as printed, untied lm_head. Only the d_model/d_ff cells change. The same 1024/4096/16/8 model is "
    "'0.25B' in the authors' Blockwise-LR code (Wang et al. 2025, modelling_llama_new.py). Alternative that "
    "fits 0.2B only: 768/3072 with depth 16 (200.2M), but it gives 228.3M (-3.7%) for the 0.25B row.")

# name -> (paper row, config values, reading, lr_max, data)
LLAMA = {
    "llama-66m": ("LLaMA (66M)", dict(d_model=512, d_ff=2048, n_head=8, depth=8), 66e6,
                  dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=8),
                  LLAMA_C4_READING, 1e-3, T5_C4),
    "llama-0.2b": ("LLaMA (0.2B)", dict(d_model=768, d_ff=3072, n_head=16, depth=8), 200e6,
                   dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=8),
                   LLAMA_01_READING + " With the C4 vocab 32000: 199.8M.", 1e-3, T5_C4),
    "llama-0.25b-owt": ("LLaMA (0.25B)", dict(d_model=768, d_ff=3072, n_head=16, depth=8), 237e6,
                        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                             num_hidden_layers=8),
                        LLAMA_01_READING + " With the GPT-2 vocab 50304: 237.3M.", 8e-4, GPT2_OWT),
    "llama-0.4b": ("LLaMA (0.4B)", dict(d_model=1280, d_ff=5120, n_head=16, depth=12), 400e6,
                   dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=12),
                   LLAMA_C4_READING + " (head_dim 80; vocab 32100 would give -0.80%).", 6e-4, T5_C4),
    "llama-1b": ("LLaMA (1B)", dict(d_model=1600, d_ff=6400, n_head=25, depth=22), 1004e6,
                 dict(hidden_size=1600, intermediate_size=6400, num_attention_heads=25, num_hidden_layers=22),
                 LLAMA_C4_READING + " head_dim 1600/25 = 64.", 3e-4, T5_C4),
    "llama-2b": ("LLaMA (2B)", dict(d_model=2048, d_ff=8096, n_head=32, depth=28), 1994e6,
                 dict(hidden_size=2048, intermediate_size=8096, num_attention_heads=32, num_hidden_layers=28),
                 LLAMA_C4_READING + " d_ff 8096 kept as printed (sic, not 8192); it reproduces 1994M.",
                 2e-4, T5_C4),
}

MOE_READING = ("d_ff = shared expert width (shared_expert_intermediate_size = d_ff); routed experts are "
               "fine-grained with moe_intermediate_size = d_ff / 4 (Qwen1.5-MoE ratio), top-4 of n_experts; "
               "total - activated = depth * (n_experts - 4) * 3 * d_model * moe_intermediate_size solves to "
               "~d_ff/4 for every row. Vocab 32000, untied lm_head, qkv bias, count incl. embeddings.")

MOE = {
    "qwen2moe-0.5b": ("Qwen2MoE (0.5B)", dict(d_model=768, d_ff=3072, n_head=12, depth=12, n_experts=16),
                      502e6, 247e6, dict(hidden_size=768, d_ff=3072, num_attention_heads=12, num_hidden_layers=12,
                                         num_experts=16), 6e-4),
    "qwen2moe-1b": ("Qwen2MoE (1B)", dict(d_model=768, d_ff=3072, n_head=12, depth=15, n_experts=32),
                    1040e6, 297e6, dict(hidden_size=768, d_ff=3072, num_attention_heads=12, num_hidden_layers=15,
                                        num_experts=32), 3e-4),
    "qwen2moe-2b": ("Qwen2MoE (2B)", dict(d_model=1024, d_ff=4096, n_head=16, depth=16, n_experts=32),
                    1945e6, 536e6, dict(hidden_size=1024, d_ff=4096, num_attention_heads=16, num_hidden_layers=16,
                                        num_experts=32), 2e-4),
}


def llama_json(values: dict, vocab: int, max_pos: int, ids: dict) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, **values,
            "num_key_value_heads": values["num_attention_heads"], "max_position_embeddings": max_pos,
            "attention_bias": False, "mlp_bias": False, **COMMON, **ids}


def moe_json(values: dict, vocab: int, max_pos: int, ids: dict, *, moe_size: int, shared: int, top_k: int) -> dict:
    return {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": vocab,
            "hidden_size": values["hidden_size"], "intermediate_size": values["d_ff"],
            "num_hidden_layers": values["num_hidden_layers"], "num_attention_heads": values["num_attention_heads"],
            "num_key_value_heads": values["num_attention_heads"], "max_position_embeddings": max_pos,
            "num_experts": values["num_experts"], "num_experts_per_tok": top_k, "moe_intermediate_size": moe_size,
            "shared_expert_intermediate_size": shared, "norm_topk_prob": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "qkv_bias": True, "use_sliding_window": False,
            "output_router_logits": True, "router_aux_loss_coef": 0.001, **COMMON, **ids}


def _rel(a: int, b: float) -> str:
    return f"{a / b - 1:+.2%}"


def _model_configs_module():
    """Load hf_gradpower/model_configs.py by path (no need to import the whole package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gp_model_configs", REPO / "hf_gradpower" / "model_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> dict[str, dict]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    count_parameters = _model_configs_module().count_parameters

    def counts(cfg: dict) -> dict:
        conf = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
        return count_parameters(conf)

    files: dict[str, dict] = {}
    for name, (paper, row, stated, values, reading, lr, data) in LLAMA.items():
        vocab, ids = (50304, GPT2_IDS) if data is GPT2_OWT else (32000, T5_IDS)
        cfg = llama_json(values, vocab, 1024, ids)
        c = counts(cfg)
        meta = {"paper": "GradPower, arXiv 2505.24275, Appendix A, Table 1", "paper_name": paper,
                "paper_row": row, "paper_params": int(stated), "paper_activated_params": None, "lr_max": lr, **data,
                "reading": reading, "computed_params": c, "total_rel_error": _rel(c["total"], stated)}
        comment = (f"{paper} of GradPower (arXiv 2505.24275) Table 1; {c['total'] / 1e6:.2f}M params vs "
                   f"{stated / 1e6:.0f}M stated ({meta['total_rel_error']}). See _gradpower.reading.")
        files[name] = {"_comment": comment, "_gradpower": meta, **cfg}

    for name, (paper, row, stated, stated_act, values, lr) in MOE.items():
        cfg = moe_json(values, 32000, 1024, T5_IDS, moe_size=values["d_ff"] // 4, shared=values["d_ff"], top_k=4)
        c = counts(cfg)
        meta = {"paper": "GradPower, arXiv 2505.24275, Appendix A, Table 2", "paper_name": paper,
                "paper_row": row, "paper_params": int(stated), "paper_activated_params": int(stated_act), "lr_max": lr,
                **T5_C4, "scheduler": "wsd", "reading": MOE_READING, "computed_params": c,
                "total_rel_error": _rel(c["total"], stated), "activated_rel_error": _rel(c["activated"], stated_act)}
        comment = (f"{paper} of GradPower (arXiv 2505.24275) Table 2; total {c['total'] / 1e6:.2f}M vs "
                   f"{stated / 1e6:.0f}M ({meta['total_rel_error']}), activated {c['activated'] / 1e6:.2f}M vs "
                   f"{stated_act / 1e6:.0f}M ({meta['activated_rel_error']}). See _gradpower.reading.")
        files[name] = {"_comment": comment, "_gradpower": meta, **cfg}

    tiny_data = {"dataset": "any (quick start / tests / benchmarks)", "seq_len": 256,
                 "tokenizer": "small BPE tokenizer of vocab 4096 trained/shipped by the data pipeline; "
                              "override vocab_size to match your tokenizer"}
    cfg = llama_json(dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4),
                     4096, 512, TINY_IDS)
    c = counts(cfg)
    files["llama-tiny"] = {
        "_comment": f"Tiny CPU LLaMA for quick start/tests/benchmarks (not in the paper); {c['total'] / 1e6:.2f}M "
                    "params; vocab_size 4096 is a parameter (load_model_config('llama-tiny', vocab_size=...)).",
        "_gradpower": {"paper_name": None, "paper_params": None, "paper_activated_params": None, "lr_max": 1e-3,
                       **tiny_data, "computed_params": c}, **cfg}
    cfg = moe_json(dict(hidden_size=128, d_ff=256, num_attention_heads=4, num_hidden_layers=4, num_experts=8),
                   4096, 512, TINY_IDS, moe_size=64, shared=256, top_k=2)
    c = counts(cfg)
    files["qwen2moe-tiny"] = {
        "_comment": f"Tiny CPU Qwen2MoE (8 experts, top-2, shared expert) for quick start/tests/benchmarks (not in "
                    f"the paper); {c['total'] / 1e6:.2f}M total / {c['activated'] / 1e6:.2f}M activated params; "
                    "vocab_size 4096 is a parameter.",
        "_gradpower": {"paper_name": None, "paper_params": None, "paper_activated_params": None, "lr_max": 1e-3,
                       **tiny_data, "computed_params": c}, **cfg}
    return files


def explore() -> None:
    """Print the closest readings of every Table 1 / Table 2 row (closed-form counts)."""
    print("LLaMA: per layer 4*d*d_attn + 3*d*d_ff + 2*d; + final norm d; + V*d (embedding) [+ V*d lm_head]")
    for paper, row, stated, *_rest in LLAMA.values():
        d, f, h, depth = row["d_model"], row["d_ff"], row["n_head"], row["depth"]
        res = []
        for vocab, (dd, ff), (lay, lay_s), attn, tied, scope in itertools.product(
                (32000, 32100, 50257, 50304), ((d, f), (1024, 4096)),
                ((depth, "depth"), (h, "depth:=n_head"), (2 * depth, "2*depth")), ("d", "h*64"),
                (False, True), ("all", "non-embedding")):
            a = dd if attn == "d" else h * 64
            n = lay * (4 * dd * a + 3 * dd * ff + 2 * dd) + dd
            if scope == "all":
                n += vocab * dd * (1 if tied else 2)
            elif tied:
                continue
            res.append((abs(n / stated - 1), f"d={dd} d_ff={ff} L={lay}({lay_s}) attn={attn} V={vocab} "
                        f"tied={tied} count={scope}: {n / 1e6:.2f}M ({_rel(n, stated)})"))
        print(f"== {paper} stated {stated / 1e6:.0f}M, printed row {row}")
        for _, s in sorted(res)[:5]:
            print("   ", s)
    print("Qwen2MoE: solve total - activated = depth * (E - 4) * 3 * d * I for the routed-expert width I")
    for paper, row, stated, act, *_rest in MOE.values():
        d, f, depth, e = row["d_model"], row["d_ff"], row["depth"], row["n_experts"]
        i = (stated - act) / (depth * (e - 4) * 3 * d)
        print(f"== {paper}: I = {i:.1f} (d_ff/4 = {f / 4:.0f}, d_ff = {f})")
        for moe_i, shared, lab in ((f, 0, "I=d_ff, no shared"), (f // 4, 0, "I=d_ff/4, no shared"),
                                   (f // 4, f, "I=d_ff/4, shared=d_ff"), (f // 4, f // 4, "I=shared=d_ff/4")):
            for vocab, tied in ((32000, False), (32000, True), (50304, False)):
                layer_fixed = 4 * d * d + 3 * d + 2 * d + e * d + 3 * d * shared + (d if shared else 0)
                tot = depth * (layer_fixed + e * 3 * d * moe_i) + d + vocab * d * (1 if tied else 2)
                actv = tot - depth * (e - 4) * 3 * d * moe_i
                print(f"    {lab:24s} V={vocab} tied={tied}: total {tot / 1e6:8.2f}M ({_rel(tot, stated)}), "
                      f"activated {actv / 1e6:7.2f}M ({_rel(actv, act)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explore", action="store_true", help="print the readings search and exit")
    args = parser.parse_args()
    if args.explore:
        explore()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for name, content in build().items():
        (OUT / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
        c = content["_gradpower"]["computed_params"]
        print(f"{name:18s} total {c['total']:>13,d} activated {c['activated']:>13,d}  "
              f"{content['_gradpower'].get('total_rel_error', '')} {content['_gradpower'].get('activated_rel_error', '')}")


if __name__ == "__main__":
    main()
