"""Data layer for pre-training: text sources -> documents -> held-out split -> packed fixed-length blocks.

Everything here is plain ``datasets`` / ``tokenizers`` / ``transformers`` (no Trainer import)::

    tok = load_tokenizer("embedded")                     # shipped byte-level BPE, vocab 4096, offline
    train, eval_ = build_datasets("embedded", tok, 256)  # shipped C4 sample (1000 docs), offline

Sources (``validate_data_source`` checks them up front, with one ``ValueError`` line):

* ``"embedded"``: the first 1000 documents of C4 ``en`` train shard 0, shipped in ``resources/``.
* a name in ``HUB_DATASETS`` (``"c4"``, ``"openwebtext"``): loaded from the Hugging Face Hub, streamed by
  default.
* a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file (optionally ``.gz`` / ``.bz2`` / ``.xz`` /
  ``.zst`` compressed), a directory of such files (searched recursively) or a glob. In ``.txt`` files every
  block of lines separated by a blank line is one document; ``.jsonl`` / ``.json`` / ``.parquet`` take the
  ``"text"`` column unless ``text_field`` names another.

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

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset

EMBEDDED = "embedded"
GPT2_EMBEDDED = "gpt2-embedded"
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "c4": ("allenai/c4", "en", "text"),
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
}
# Hub datasets too large to download in full by default.
STREAMING_BY_DEFAULT = frozenset({"c4", "openwebtext"})

RESOURCES = Path(__file__).resolve().parent / "resources"
EMBEDDED_CORPUS = RESOURCES / "c4_sample.jsonl"
EMBEDDED_TOKENIZER = RESOURCES / "tokenizer-c4-4k"
GPT2_TOKENIZER = RESOURCES / "tokenizer-gpt2"

# extension -> datasets packaged builder
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
}
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")
_GLOB_CHARS = frozenset("*?[")

PACK_DOCS = 1000  # documents per packing group (see module docstring)
TOKENIZE_BATCH = 1000
DEFAULT_EVAL_FRACTION = 0.05
DEFAULT_STREAMING_EVAL_DOCS = 1000  # held-out documents for streaming sources (their length is unknown)
DEFAULT_SHUFFLE_BUFFER = 10_000

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "DEFAULT_STREAMING_EVAL_DOCS",
    "EMBEDDED",
    "GPT2_EMBEDDED",
    "HUB_DATASETS",
    "SUPPORTED_EXTENSIONS",
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


# ------------------------------------------------------------------------------------------------ sources


def _format_of(path: str) -> tuple[str | None, str]:
    """(builder or None, the extension that decides it) for a file path."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSION_EXTENSIONS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    return SUPPORTED_EXTENSIONS.get(ext), ext


def _choices() -> str:
    names = ", ".join([EMBEDDED, *HUB_DATASETS])
    exts = "/".join(SUPPORTED_EXTENSIONS)
    return f"choose one of: {names}, or a path to a {exts} file, a directory or a glob of such files"


def _check_file(path: str) -> str:
    builder, ext = _format_of(path)
    if builder is None:
        raise ValueError(f"unsupported file extension {ext or '(none)'!r} for data file {path!r}; supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)} (optionally {'/'.join(COMPRESSION_EXTENSIONS)})")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"data file {path!r} is empty")
    compressed = Path(path).suffix.lower() in COMPRESSION_EXTENSIONS
    if builder != "parquet" and not compressed and size < (1 << 20):
        with open(path, encoding="utf-8", errors="replace") as f:
            if not f.read().strip():
                raise ValueError(f"data file {path!r} is empty (whitespace only)")
    return builder


def _resolve_local(source: str) -> tuple[str, list[str]] | None:
    """(builder, sorted files) for a local file / directory / glob, None when ``source`` is not local."""
    path = os.path.expanduser(source)
    if any(c in path for c in _GLOB_CHARS) and not os.path.exists(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"data glob {source!r} matches no files")
        unsupported = [p for p in files if _format_of(p)[0] is None]
        if unsupported:
            _check_file(unsupported[0])  # raises the unsupported-extension error
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*")
            if p.is_file() and _format_of(str(p))[0] is not None and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(f"data directory {source!r} contains no {'/'.join(SUPPORTED_EXTENSIONS)} files")
    elif os.path.isfile(path):
        files = [path]
    else:
        return None
    builders = {_check_file(p) for p in files}
    if len(builders) > 1:
        raise ValueError(f"data source {source!r} mixes file formats ({', '.join(sorted(builders))}); "
                         "use files of one format")
    return builders.pop(), files


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or Path(source).suffix.lower() in (*SUPPORTED_EXTENSIONS, *COMPRESSION_EXTENSIONS))


def validate_data_source(source: str) -> None:
    """Raise one clear ``ValueError`` line for a bad data source; cheap (stat / small reads, no loading)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"data source must be a non-empty string; got {source!r}; {_choices()}")
    source = str(source)
    if source == EMBEDDED:
        if not EMBEDDED_CORPUS.is_file():
            raise ValueError(f"the embedded corpus is missing from the installed package ({EMBEDDED_CORPUS})")
        return
    if source in HUB_DATASETS:
        return
    if _resolve_local(source) is not None:
        return
    if _looks_like_path(source):
        raise ValueError(f"data file or directory not found: {source!r}; {_choices()}")
    raise ValueError(f"unknown data source {source!r}; {_choices()}")


# ---------------------------------------------------------------------------------------------- loading


def _column_names(ds: Dataset | IterableDataset) -> list[str] | None:
    return list(ds.column_names) if ds.column_names is not None else None


def _to_text_column(ds: Dataset | IterableDataset, field: str, source: str) -> Dataset | IterableDataset:
    """Keep only ``field``, renamed to ``"text"``."""
    columns = _column_names(ds)
    if columns is None:  # streaming with unknown features: select per example
        return ds.map(lambda ex: {"text": ex[field]}).select_columns(["text"])
    if field not in columns:
        raise ValueError(f"data source {source!r} has no text field {field!r}; columns: {', '.join(columns)} "
                         "(pass text_field=...)")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds


def _clean_paragraphs(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    texts = [t.strip("\n") for t in batch["text"] if t is not None]
    return {"text": [t for t in texts if t.strip()]}


def load_text_dataset(
    source: str,
    *,
    streaming: bool | None = None,
    split: str = "train",
    text_field: str | None = None,
    seed: int = 0,
) -> Dataset | IterableDataset:
    """Load ``source`` as documents: a ``Dataset`` (or ``IterableDataset`` when streaming) with one ``"text"``
    column, in source order (``seed`` is accepted for symmetry with ``build_datasets``; loading never
    shuffles).

    ``streaming=None`` means True for ``STREAMING_BY_DEFAULT`` Hub datasets, False otherwise. ``split`` is the
    Hub split (local files only have ``"train"``; map-style loading also accepts slices such as
    ``"train[:10%]"``). ``text_field`` overrides the text column (default ``"text"``).
    """
    del seed
    validate_data_source(source)
    source = str(source)
    if source == EMBEDDED:
        ds = load_dataset("json", data_files=str(EMBEDDED_CORPUS), split=split, streaming=bool(streaming))
        return _to_text_column(ds, text_field or "text", source)
    if source in HUB_DATASETS:
        path, config, field = HUB_DATASETS[source]
        if streaming is None:
            streaming = source in STREAMING_BY_DEFAULT
        ds = load_dataset(path, config, split=split, streaming=streaming)
        return _to_text_column(ds, text_field or field, source)
    resolved = _resolve_local(source)
    assert resolved is not None  # validate_data_source passed
    builder, files = resolved
    if builder == "text":
        if text_field not in (None, "text"):
            raise ValueError(f"text_field={text_field!r} does not apply to .txt files "
                             "(each paragraph is a document)")
        ds = load_dataset(
            "text", data_files=files, split=split, streaming=bool(streaming), sample_by="paragraph"
        )
        return ds.map(_clean_paragraphs, batched=True)
    ds = load_dataset(builder, data_files=files, split=split, streaming=bool(streaming))
    return _to_text_column(ds, text_field or "text", source)


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
    columns = _column_names(dataset)
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
    source: str,
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

    ``tokenizer`` is a tokenizer or a name for ``load_tokenizer``. The order is deterministic given ``seed``:
    map-style sources are split and shuffled by document with ``seed``; streaming sources hold out their first
    documents and buffer-shuffle the rest (``shuffle_buffer`` documents, shard order shuffled too) with
    ``seed``. ``shuffle=False`` keeps source order in both cases (then both paths yield the same blocks).
    ``max_train_blocks`` caps the train blocks. ``eval_blocks`` is ``None`` when evaluation is disabled
    (``eval_docs=0`` / ``eval_fraction=0``). The returned datasets are not sharded per process; Accelerate /
    the Trainer do that (see the module docstring).
    """
    validate_data_source(source)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int; got {seq_len!r}")
    if max_train_blocks is not None and (not isinstance(max_train_blocks, int) or max_train_blocks < 1):
        raise ValueError(f"max_train_blocks must be a positive int or None; got {max_train_blocks!r}")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    docs = load_text_dataset(source, streaming=streaming, split=split, text_field=text_field, seed=seed)
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
            raise ValueError(f"data source {source!r} gives no training block of {seq_len} tokens; "
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
