"""Text sources for pre-training: which sources exist, one up-front check, and loading them as documents.

Sources (``validate_data_source`` checks one with cheap stats and small reads, and returns the resolved
:class:`DataSource` that :func:`load_text_dataset` then loads without checking again):

* ``"embedded"``: the first 1000 documents of C4 ``en`` train shard 0, shipped in ``resources/``.
* a name in ``HUB_DATASETS`` (``"c4"``, ``"openwebtext"``): loaded from the Hugging Face Hub, streamed by
  default.
* a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file (optionally ``.gz`` / ``.bz2`` / ``.xz`` /
  ``.zst`` compressed), a directory of such files (searched recursively) or a glob. In ``.txt`` files every
  block of lines separated by a blank line is one document; ``.jsonl`` / ``.json`` / ``.parquet`` take the
  ``"text"`` column unless ``text_field`` names another.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset

EMBEDDED = "embedded"
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "c4": ("allenai/c4", "en", "text"),
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
}
# Hub datasets too large to download in full by default.
STREAMING_BY_DEFAULT = frozenset({"c4", "openwebtext"})

RESOURCES = Path(__file__).resolve().parent / "resources"
EMBEDDED_CORPUS = RESOURCES / "c4_sample.jsonl"

# extension -> datasets packaged builder
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
}
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst")
_GLOB_CHARS = frozenset("*?[")
_SNIFF_BYTES = 1 << 16  # bytes read from each local file to tell text from binary


@dataclass(frozen=True)
class DataSource:
    """A checked source: ``kind`` is ``"embedded"``, ``"hub"`` or ``"local"``; local ones carry their files."""

    name: str
    kind: str
    builder: str | None = None
    files: tuple[str, ...] = ()


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
    """The builder for one local file, after checking from its first bytes that it holds what it claims."""
    builder, ext = _format_of(path)
    if builder is None:
        raise ValueError(f"unsupported file extension {ext or '(none)'!r} for data file {path!r}; supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)} (optionally {'/'.join(COMPRESSION_EXTENSIONS)})")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"data file {path!r} is empty")
    if Path(path).suffix.lower() in COMPRESSION_EXTENSIONS:
        return builder
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    whole = size <= _SNIFF_BYTES
    if builder == "parquet":
        if not head.startswith(b"PAR1"):
            raise ValueError(f"data file {path!r} is not a Parquet file (no PAR1 header); pass a real .parquet file")
        return builder
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}; a binary file?); "
                         f"pass a text {ext} file") from None
    lines = text.split("\n") if whole else text.split("\n")[:-1]  # the last line read may be cut short
    if whole and not text.strip():
        raise ValueError(f"data file {path!r} is empty (whitespace only)")
    first = next((line for line in lines if line.strip()), None)
    if ext == ".jsonl" and first is not None:
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"data file {path!r}: the first line is not a JSON object; a .jsonl file holds one "
                             '{"text": ...} object per line')
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


def validate_data_source(source: str | os.PathLike) -> DataSource:
    """Check ``source`` and resolve it (``ValueError``, one line, when it is unusable); cheap: stats and a
    few KiB read per file, nothing loaded. Pass the result to :func:`load_text_dataset` to skip a second check.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"data source must be a non-empty string; got {source!r}; {_choices()}")
    source = str(source)
    if source == EMBEDDED:
        if not EMBEDDED_CORPUS.is_file():
            raise ValueError(f"the embedded corpus is missing from the installed package ({EMBEDDED_CORPUS})")
        return DataSource(source, "embedded", "json", (str(EMBEDDED_CORPUS),))
    if source in HUB_DATASETS:
        return DataSource(source, "hub")
    local = _resolve_local(source)
    if local is not None:
        return DataSource(source, "local", local[0], tuple(local[1]))
    if _looks_like_path(source):
        raise ValueError(f"data file or directory not found: {source!r}; {_choices()}")
    raise ValueError(f"unknown data source {source!r}; {_choices()}")


# ------------------------------------------------------------------------------------------ loading


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
    source: str | DataSource,
    *,
    streaming: bool | None = None,
    split: str = "train",
    text_field: str | None = None,
) -> Dataset | IterableDataset:
    """Load ``source`` as documents: a ``Dataset`` (or ``IterableDataset`` when streaming) with one ``"text"``
    column, in source order (loading never shuffles).

    ``source`` is a name/path (checked here) or the :class:`DataSource` ``validate_data_source`` returned.
    ``streaming=None`` means True for ``STREAMING_BY_DEFAULT`` Hub datasets, False otherwise. ``split`` is the
    Hub split (local files only have ``"train"``; map-style loading also accepts slices such as
    ``"train[:10%]"``). ``text_field`` overrides the text column (default ``"text"``).
    """
    if not isinstance(source, DataSource):
        source = validate_data_source(source)
    if source.kind == "hub":
        path, config, field = HUB_DATASETS[source.name]
        if streaming is None:
            streaming = source.name in STREAMING_BY_DEFAULT
        ds = load_dataset(path, config, split=split, streaming=streaming)
        return _to_text_column(ds, text_field or field, source.name)
    files = list(source.files)
    if source.builder == "text":
        if text_field not in (None, "text"):
            raise ValueError(f"text_field={text_field!r} does not apply to .txt files "
                             "(each paragraph is a document)")
        ds = load_dataset(
            "text", data_files=files, split=split, streaming=bool(streaming), sample_by="paragraph"
        )
        return ds.map(_clean_paragraphs, batched=True)
    ds = load_dataset(source.builder, data_files=files, split=split, streaming=bool(streaming))
    return _to_text_column(ds, text_field or "text", source.name)
