"""Data layer for pre-training: text sources -> documents -> held-out split -> packed fixed-length blocks.

Everything here is plain ``datasets`` / ``tokenizers`` / ``transformers`` (no Trainer import)::

    tok = load_tokenizer("embedded")                     # shipped byte-level BPE, vocab 4096, offline
    train, eval_ = build_datasets("embedded", tok, 256)  # shipped C4 sample (1000 docs), offline

Sources (``"embedded"``, ``"c4"``, ``"openwebtext"``, local files, folders and globs) are checked and loaded
as documents by ``data_sources`` (re-exported here); this module turns documents into training blocks.

Held-out evaluation data is split off by *document*, before packing, so no document contributes tokens to
both splits. Documents are tokenised without special tokens, EOS is appended after each one and the stream
is cut into blocks of exactly ``seq_len`` tokens (``input_ids`` and an identical ``labels`` column; no
``attention_mask``: every position is real). Packing works on groups of ``PACK_DOCS`` consecutive documents
and the last incomplete block of each group is dropped (the ``run_clm`` convention; < 0.1% of the tokens
when documents average a few hundred tokens and ``seq_len`` is about a thousand). Map-style and streaming
datasets form the same groups, so the two paths give identical blocks when nothing is shuffled.

Multi-process training: the datasets returned here are plain, unsharded datasets. Each process gets
distinct data later, from Accelerate / the Trainer (a distributed sampler for map-style datasets,
``IterableDatasetShard`` / ``split_dataset_by_node``-style dispatch for streaming ones), so do not shard
them yourself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from datasets import Dataset, IterableDataset

from hf_gradpower.data_sources import (
    COMPRESSION_EXTENSIONS,
    EMBEDDED,
    HUB_DATASETS,
    RESOURCES,
    STREAMING_BY_DEFAULT,
    SUPPORTED_EXTENSIONS,
    DataSource,
    load_text_dataset,
    validate_data_source,
)

GPT2_EMBEDDED = "gpt2-embedded"
EMBEDDED_TOKENIZER = RESOURCES / "tokenizer-c4-4k"
GPT2_TOKENIZER = RESOURCES / "tokenizer-gpt2"

PACK_DOCS = 1000  # documents per packing group (see module docstring)
TOKENIZE_BATCH = 1000
DEFAULT_EVAL_FRACTION = 0.05
DEFAULT_STREAMING_EVAL_DOCS = 1000  # held-out documents for streaming sources (their length is unknown)
DEFAULT_SHUFFLE_BUFFER = 10_000

__all__ = [
    "COMPRESSION_EXTENSIONS",
    "DEFAULT_EVAL_FRACTION",
    "DEFAULT_STREAMING_EVAL_DOCS",
    "EMBEDDED",
    "GPT2_EMBEDDED",
    "HUB_DATASETS",
    "STREAMING_BY_DEFAULT",
    "SUPPORTED_EXTENSIONS",
    "DataSource",
    "build_datasets",
    "count_tokens",
    "load_text_dataset",
    "load_tokenizer",
    "pack_dataset",
    "train_eval_split",
    "validate_data_source",
]


# --------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str = EMBEDDED):
    """Load a fast tokenizer with ``pad_token`` set (to EOS when it has none).

    ``"embedded"``: the shipped byte-level BPE (vocab 4096, ``<|endoftext|>`` = id 0 = eos = pad), trained on
    the shipped C4 sample by ``scripts/make_tokenizer.py``. ``"gpt2-embedded"``: the shipped GPT-2 tokenizer
    (vocab 50257, eos = pad = 50256). Anything else goes to ``AutoTokenizer.from_pretrained`` (a Hub id or a
    local directory). Returns a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5).
    """
    from transformers import AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"tokenizer must be {EMBEDDED!r}, {GPT2_EMBEDDED!r}, a Hub id or a local path; "
                         f"got {name_or_path!r}")
    name = str(name_or_path)
    local = {EMBEDDED: EMBEDDED_TOKENIZER, GPT2_EMBEDDED: GPT2_TOKENIZER}.get(name)
    if local is not None:
        if not local.is_dir():
            raise ValueError(f"the {name!r} tokenizer is missing from the installed package ({local}); "
                             "reinstall hf-gradpower or rebuild it with scripts/make_tokenizer.py")
        tokenizer = AutoTokenizer.from_pretrained(str(local))
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizers) backend; packing needs one")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an eos token; set one before packing")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- packing


def _tokenize_fn(tokenizer, add_eos: bool) -> Callable[[dict[str, list[Any]]], dict[str, list[list[int]]]]:
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        if add_eos:
            ids = [x + [eos] for x in ids]
        return {"input_ids": ids}

    return tokenize


def _group_fn(seq_len: int) -> Callable[[dict[str, list[list[int]]]], dict[str, list[list[int]]]]:
    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // seq_len * seq_len
        blocks = [flat[i : i + seq_len] for i in range(0, n, seq_len)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    return group


def pack_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    seq_len: int,
    *,
    add_eos: bool = True,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenise the ``"text"`` column and pack it into blocks of exactly ``seq_len`` tokens.

    Each document's ids (no special tokens) are followed by ``eos_token_id`` (``add_eos``); consecutive
    documents are concatenated in groups of ``PACK_DOCS`` and cut into blocks, the incomplete tail of each
    group dropped. Output columns: ``input_ids`` and ``labels`` (a copy; the model shifts). Map-style: the
    tokenisation runs with ``num_proc`` processes, grouping in one process, so the result does not depend on
    ``num_proc``. Streaming: the same two lazy ``.map`` steps (``num_proc`` is ignored).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True needs a tokenizer with an eos token")
    columns = list(dataset.column_names) if dataset.column_names is not None else None
    if columns is not None and "text" not in columns:
        raise ValueError(f"pack_dataset needs a 'text' column; columns: {', '.join(columns)}")
    tokenize, group = _tokenize_fn(tokenizer, add_eos), _group_fn(seq_len)
    if isinstance(dataset, IterableDataset):
        tokenized = dataset.map(tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=columns)
        return tokenized.map(group, batched=True, batch_size=PACK_DOCS, remove_columns=["input_ids"])
    tokenized = dataset.map(
        tokenize, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=columns, num_proc=num_proc,
        desc="Tokenizing",
    )
    return tokenized.map(group, batched=True, batch_size=PACK_DOCS, desc=f"Packing into blocks of {seq_len}")


def count_tokens(dataset: Dataset) -> int:
    """Tokens in a packed map-style dataset: blocks * seq_len."""
    if isinstance(dataset, IterableDataset):
        raise TypeError("count_tokens needs a map-style Dataset (a streaming dataset has no length)")
    if len(dataset) == 0:
        return 0
    return len(dataset) * len(dataset[0]["input_ids"])


# ------------------------------------------------------------------------------------------- composition


def train_eval_split(
    dataset: Dataset | IterableDataset,
    *,
    eval_fraction: float | None = DEFAULT_EVAL_FRACTION,
    eval_docs: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """Hold out documents (before packing): ``(train_docs, eval_docs)``, disjoint by document.

    ``eval_docs`` (a count) wins over ``eval_fraction``; 0 disables evaluation (eval is ``None``).
    Map-style: ``train_test_split(seed=seed)``, so both the held-out set and the train order follow the
    seed; with ``shuffle=False`` the first documents are held out and the rest kept in order. Streaming:
    the first ``eval_docs`` documents (default ``DEFAULT_STREAMING_EVAL_DOCS``) are held out and skipped
    for training, whatever the seed (buffer shuffling of the train stream happens in ``build_datasets``).
    """
    bad_count = isinstance(eval_docs, bool) or not isinstance(eval_docs, int) or eval_docs < 0
    if eval_docs is not None and bad_count:
        raise ValueError(f"eval_docs must be a non-negative int; got {eval_docs!r}")
    if eval_docs is None and eval_fraction is not None and not 0.0 <= float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction!r}")
    if isinstance(dataset, IterableDataset):
        n_eval = DEFAULT_STREAMING_EVAL_DOCS if eval_docs is None else eval_docs
        if n_eval == 0:
            return dataset, None
        return dataset.skip(n_eval), dataset.take(n_eval)
    n = len(dataset)
    n_eval = eval_docs if eval_docs is not None else round(n * float(eval_fraction or 0.0))
    if eval_docs is None and eval_fraction and n_eval == 0 and n > 1:
        n_eval = 1
    if n_eval == 0:
        return (dataset.shuffle(seed=seed) if shuffle else dataset), None
    if n_eval >= n:
        raise ValueError(f"cannot hold out {n_eval} of {n} documents for evaluation; "
                         "lower eval_docs/eval_fraction")
    if not shuffle:
        return dataset.select(range(n_eval, n)), dataset.select(range(n_eval))
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def build_datasets(
    source: str | DataSource,
    tokenizer,
    seq_len: int,
    *,
    eval_docs: int | None = None,
    eval_fraction: float | None = DEFAULT_EVAL_FRACTION,
    seed: int = 0,
    streaming: bool | None = None,
    max_train_blocks: int | None = None,
    text_field: str | None = None,
    split: str = "train",
    shuffle: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """``(train_blocks, eval_blocks)`` for ``source``: validate -> load -> hold out documents -> pack.

    ``source`` is a name/path or an already checked :class:`DataSource`; ``tokenizer`` is a tokenizer or a
    name for ``load_tokenizer``. The order is deterministic given ``seed``:
    map-style sources are split and shuffled by document with ``seed``; streaming sources hold out their first
    documents and buffer-shuffle the rest (``shuffle_buffer`` documents, shard order shuffled too) with
    ``seed``. ``shuffle=False`` keeps source order in both cases (then both paths yield the same blocks).
    ``max_train_blocks`` caps the train blocks. ``eval_blocks`` is ``None`` when evaluation is disabled
    (``eval_docs=0`` / ``eval_fraction=0``). The returned datasets are not sharded per process; Accelerate /
    the Trainer do that (see the module docstring).
    """
    if not isinstance(source, DataSource):
        source = validate_data_source(source)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if max_train_blocks is not None and (not isinstance(max_train_blocks, int) or max_train_blocks < 1):
        raise ValueError(f"max_train_blocks must be a positive int or None; got {max_train_blocks!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    docs = load_text_dataset(source, streaming=streaming, split=split, text_field=text_field)
    train_docs, eval_docs_ds = train_eval_split(
        docs, eval_fraction=eval_fraction, eval_docs=eval_docs, seed=seed, shuffle=shuffle
    )
    if shuffle and isinstance(train_docs, IterableDataset):
        train_docs = train_docs.shuffle(seed=seed, buffer_size=shuffle_buffer)
    train = pack_dataset(train_docs, tokenizer, seq_len, num_proc=num_proc)
    evaluation = None
    if eval_docs_ds is not None:
        evaluation = pack_dataset(eval_docs_ds, tokenizer, seq_len, num_proc=num_proc)
    if isinstance(train, Dataset):
        if len(train) == 0:
            raise ValueError(f"data source {source.name!r} gives no training block of {seq_len} tokens; "
                             "lower seq_len")
        if evaluation is not None and len(evaluation) == 0:
            raise ValueError(f"the held-out documents give no evaluation block of {seq_len} tokens; "
                             "raise eval_docs/eval_fraction or lower seq_len")
    if max_train_blocks is not None:
        if isinstance(train, Dataset):
            train = train.select(range(min(max_train_blocks, len(train))))
        else:
            train = train.take(max_train_blocks)
    return train, evaluation
