"""Rebuild the embedded resources in ``hf_gradpower/resources/`` (no network needed).

1. ``c4_sample.jsonl``: the first 1000 documents of C4 ``en`` train shard 0, reduced to the ``text`` field
   (one ``{"text": ...}`` JSON object per line, ``ensure_ascii=False``, original order).
2. ``tokenizer-c4-4k/``: a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no normaliser, no prefix
   space) with a vocabulary of 4096, trained with the ``tokenizers`` library on that corpus.
   ``<|endoftext|>`` is the only special token (id 0); it is eos, bos, unk and pad. Training is
   deterministic: the corpus is fed in file order and re-running this script reproduces ``tokenizer.json``
   byte for byte (checked with and without ``TOKENIZERS_PARALLELISM``; sha256 in ``resources/README.md``).
3. ``tokenizer-gpt2/``: the GPT-2 ``vocab.json`` + ``merges.txt`` copied byte for byte, plus a
   ``tokenizer_config.json`` so that ``AutoTokenizer.from_pretrained`` loads it offline.

Usage::

    python scripts/make_tokenizer.py [--data /work/shared/data] [--out hf_gradpower/resources]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_corpus(src: Path, dst: Path) -> list[str]:
    lines = src.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    with dst.open("w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return texts


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id(EOS) == 0
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1_000_000_000,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    fast.save_pretrained(str(out_dir))
    # Compact tokenizer.json (the pretty-printed one is 2.5x larger) and a class name that both
    # transformers 4.x and 5.x resolve (5.x writes its new "TokenizersBackend" name by default).
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_gpt2(src: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out_dir / name)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "model_max_length": 1024,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=REPO / "hf_gradpower" / "resources")
    parser.add_argument("--no-gpt2", action="store_true", help="do not ship the GPT-2 tokenizer files")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "c4_sample.jsonl"
    texts = write_corpus(args.data / "corpus" / "c4_sample" / "c4_sample.jsonl", corpus)
    train_tokenizer(texts, args.out / "tokenizer-c4-4k")
    if not args.no_gpt2:
        copy_gpt2(args.data / "tokenizers" / "gpt2", args.out / "tokenizer-gpt2")
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(args.out)}  {path.stat().st_size:>9,d}  sha256={sha256(path)}")


if __name__ == "__main__":
    main()
