"""Data layer: embedded tokenizer/corpus, packing, document-level held-out split, local sources, errors."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, IterableDataset

from hf_gradpower import data, data_sources

DOCS = ["The cat sat on the mat.", "Packing joins documents with EOS.", "Ünïcode and numbers 12345 too!"]


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(data.EMBEDDED)


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, texts, field="text"):
    lines = [json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _numbered_docs(n):
    return [f"document number {i}: " + " ".join(f"w{i}x{j}" for j in range(5 + i % 7)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- tokenizer


def test_embedded_tokenizer_offline(tok):
    assert tok.is_fast
    assert len(tok) == 4096 and tok.vocab_size == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == tok.eos_token_id
    text = "Hello, world!\n\nTabs\tand  double spaces, Ünïcode 日本語 and 3.14159."
    ids = _ids(tok, text)
    assert all(0 <= i < 4096 for i in ids)
    assert tok.decode(ids) == text


def test_gpt2_embedded_tokenizer_offline():
    gpt2 = data.load_tokenizer(data.GPT2_EMBEDDED)
    assert len(gpt2) == 50257 and gpt2.eos_token_id == 50256 and gpt2.pad_token_id == 50256
    assert _ids(gpt2, "Hello world") == [15496, 995]  # the canonical GPT-2 ids


def test_load_tokenizer_rejects_bad_argument():
    with pytest.raises(ValueError, match="tokenizer must be"):
        data.load_tokenizer("")


# ------------------------------------------------------------------------------------------------ packing


def test_pack_exact_ids_labels_and_remainder(tok):
    stream = []
    for d in DOCS:
        stream += _ids(tok, d) + [tok.eos_token_id]
    seq_len = 7
    assert len(stream) % seq_len != 0  # there is a remainder to drop
    packed = data.pack_dataset(Dataset.from_dict({"text": DOCS, "meta": [1, 2, 3]}), tok, seq_len)
    assert packed.column_names == ["input_ids", "labels"]
    n_blocks = len(stream) // seq_len
    assert len(packed) == n_blocks
    expected = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n_blocks)]
    assert packed["input_ids"][:] == expected
    assert packed["labels"][:] == expected
    assert all(len(b) == seq_len for b in packed["input_ids"])
    assert data.count_tokens(packed) == n_blocks * seq_len
    # EOS sits exactly between documents
    flat = [t for b in packed["input_ids"] for t in b]
    n0, n1 = len(_ids(tok, DOCS[0])), len(_ids(tok, DOCS[1]))
    assert flat[n0] == flat[n0 + 1 + n1] == tok.eos_token_id
    assert tok.eos_token_id not in _ids(tok, DOCS[0]) + _ids(tok, DOCS[1])


def test_pack_without_eos_and_bad_seq_len(tok):
    packed = data.pack_dataset(Dataset.from_dict({"text": DOCS}), tok, 4, add_eos=False)
    flat = [t for b in packed["input_ids"] for t in b]
    assert tok.eos_token_id not in flat
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            data.pack_dataset(Dataset.from_dict({"text": DOCS}), tok, bad)


def test_pack_streaming_matches_map_style(tok, tmp_path):
    texts = _numbered_docs(40)
    path = _write_jsonl(tmp_path / "docs.jsonl", texts)
    mapped = data.pack_dataset(data.load_text_dataset(str(path)), tok, 16)
    streamed = data.load_text_dataset(str(path), streaming=True)
    assert isinstance(streamed, IterableDataset)
    streamed = data.pack_dataset(streamed, tok, 16)
    assert [ex["input_ids"] for ex in streamed] == mapped["input_ids"][:]


# ------------------------------------------------------------------------------------------- split


def test_split_disjoint_by_document_and_seeded():
    texts = _numbered_docs(100)
    ds = Dataset.from_dict({"text": texts})
    train, ev = data.train_eval_split(ds, eval_docs=10, seed=1)
    assert len(ev) == 10 and len(train) == 90
    assert set(train["text"]).isdisjoint(ev["text"])
    assert set(train["text"]) | set(ev["text"]) == set(texts)
    train2, ev2 = data.train_eval_split(ds, eval_docs=10, seed=1)
    assert train2["text"][:] == train["text"][:] and ev2["text"][:] == ev["text"][:]
    train3, _ = data.train_eval_split(ds, eval_docs=10, seed=2)
    assert train3["text"][:] != train["text"][:]
    _, ev_frac = data.train_eval_split(ds, eval_fraction=0.2, seed=0)
    assert len(ev_frac) == 20
    assert data.train_eval_split(ds, eval_docs=0)[1] is None
    with pytest.raises(ValueError, match="cannot hold out"):
        data.train_eval_split(ds, eval_docs=100)


def test_split_streaming_holds_out_first_docs(tmp_path):
    texts = _numbered_docs(30)
    streamed = data.load_text_dataset(str(_write_jsonl(tmp_path / "d.jsonl", texts)), streaming=True)
    train, ev = data.train_eval_split(streamed, eval_docs=5)
    assert [ex["text"] for ex in ev] == texts[:5]
    assert [ex["text"] for ex in train] == texts[5:]


def test_build_datasets_embedded_deterministic(tok):
    kw = dict(eval_docs=10, split="train[:60]", max_train_blocks=20)
    train, ev = data.build_datasets(data.EMBEDDED, tok, 64, seed=0, **kw)
    assert len(train) == 20 and len(ev) > 0
    assert all(len(b) == 64 for b in train["input_ids"]) and train["labels"][:] == train["input_ids"][:]
    again, _ = data.build_datasets(data.EMBEDDED, tok, 64, seed=0, **kw)
    other, _ = data.build_datasets(data.EMBEDDED, tok, 64, seed=1, **kw)
    assert again["input_ids"][:] == train["input_ids"][:]
    assert other["input_ids"][:] != train["input_ids"][:]


def test_build_datasets_streaming_equals_map_style_unshuffled(tok, tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _numbered_docs(60)))
    m_train, m_eval = data.build_datasets(path, tok, 16, eval_docs=8, shuffle=False)
    s_train, s_eval = data.build_datasets(path, tok, 16, eval_docs=8, shuffle=False, streaming=True)
    assert isinstance(s_train, IterableDataset)
    assert [ex["input_ids"] for ex in s_eval] == m_eval["input_ids"][:]
    assert [ex["input_ids"] for ex in s_train] == m_train["input_ids"][:]
    # shuffled streaming: same seed, same order; eval set is still the first documents
    a, _ = data.build_datasets(path, tok, 16, eval_docs=8, seed=3, streaming=True, shuffle_buffer=16)
    b, _ = data.build_datasets(path, tok, 16, eval_docs=8, seed=3, streaming=True, shuffle_buffer=16)
    assert [ex["input_ids"] for ex in a] == [ex["input_ids"] for ex in b]


# ------------------------------------------------------------------------------------------ local files


def test_local_txt_jsonl_parquet_dir_glob(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First doc line 1\nline 2\n\nSecond doc\n\n\n\nThird doc\n", encoding="utf-8")
    expected = ["First doc line 1\nline 2", "Second doc", "Third doc"]
    assert data.load_text_dataset(str(txt))["text"][:] == expected

    jsonl = _write_jsonl(tmp_path / "b.jsonl", ["alpha", "beta"], field="body")
    ds = data.load_text_dataset(str(jsonl), text_field="body")
    assert ds.column_names == ["text"] and ds["text"][:] == ["alpha", "beta"]
    with pytest.raises(ValueError, match="no text field 'text'"):
        data.load_text_dataset(str(jsonl))

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    Dataset.from_dict({"text": ["p1", "p2"], "n": [1, 2]}).to_parquet(str(pq_dir / "part-0.parquet"))
    Dataset.from_dict({"text": ["p3"], "n": [3]}).to_parquet(str(pq_dir / "part-1.parquet"))
    assert data.load_text_dataset(str(pq_dir / "part-0.parquet"))["text"][:] == ["p1", "p2"]
    assert data.load_text_dataset(str(pq_dir))["text"][:] == ["p1", "p2", "p3"]
    assert data.load_text_dataset(str(pq_dir / "*.parquet"))["text"][:] == ["p1", "p2", "p3"]


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("load_dataset must not be reached for an invalid source")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: "no_such_dataset", r"unknown data source 'no_such_dataset'; choose one of: embedded, c4"),
        (lambda p: str(p / "missing.jsonl"), r"not found: .*missing\.jsonl.*choose one of"),
        (lambda p: str(p / "no_match_*.txt"), r"matches no files"),
        (lambda p: _touch(p / "empty.jsonl", ""), r"is empty"),
        (lambda p: _touch(p / "blank.txt", "\n \n\n"), r"is empty"),
        (lambda p: _touch(p / "data.csv", "text\nhello\n"), r"unsupported file extension '\.csv'"),
        (lambda p: (p / "emptydir").mkdir() or str(p / "emptydir"), r"contains no"),
        (lambda p: "", r"non-empty string"),
        (lambda p: _touch_bytes(p / "weights.jsonl", bytes(range(256)) * 64), r"is not UTF-8 text.*binary"),
        (lambda p: _touch_bytes(p / "latin1.txt", "caf\xe9\n".encode("latin-1")), r"is not UTF-8 text"),
        (lambda p: _touch(p / "plain.jsonl", "just words\n"), r"first line is not a JSON object"),
        (lambda p: _touch(p / "fake.parquet", "not parquet"), r"not a Parquet file"),
    ],
)
def test_bad_sources_raise_one_clear_error_before_loading(tmp_path, monkeypatch, make, match):
    source = make(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        data.validate_data_source(source)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(data_sources, "load_dataset", _fail_if_loaded)
    with pytest.raises(ValueError, match=match):
        data.load_text_dataset(source)
    with pytest.raises(ValueError, match=match):
        data.build_datasets(source, "this-tokenizer-is-never-loaded", 8)


def _touch_bytes(path, content: bytes):
    path.write_bytes(content)
    return str(path)


def _touch(path, content):
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_valid_sources_resolve_to_what_is_loaded(tmp_path):
    embedded = data.validate_data_source(data.EMBEDDED)
    assert (embedded.kind, embedded.builder, embedded.files) == ("embedded", "json", (str(data_sources.EMBEDDED_CORPUS),))
    for name in data.HUB_DATASETS:
        assert data.validate_data_source(name) == data.DataSource(name, "hub")  # no network: names only
    ok = _touch(tmp_path / "ok.txt", "hello")
    (tmp_path / "sub").mkdir()
    nested = _touch(tmp_path / "sub" / "more.txt", "world")
    _touch(tmp_path / ".hidden.txt", "skipped")
    assert data.validate_data_source(ok).files == (ok,)
    folder = data.validate_data_source(str(tmp_path))
    assert (folder.kind, folder.builder, folder.files) == ("local", "text", (ok, nested))


def test_a_checked_source_is_loaded_as_checked(tmp_path):
    """The resolved source is loaded as is (no second look at the folder): a file added after the check is
    not read, while the folder's name, checked again, picks it up."""
    _touch(tmp_path / "a.txt", "first doc")
    source = data.validate_data_source(str(tmp_path))
    _touch(tmp_path / "b.txt", "second doc")
    assert data.load_text_dataset(source)["text"][:] == ["first doc"]
    assert data.load_text_dataset(str(tmp_path))["text"][:] == ["first doc", "second doc"]


def test_count_tokens_rejects_streaming(tok, tmp_path):
    streamed = data.load_text_dataset(str(_write_jsonl(tmp_path / "d.jsonl", DOCS)), streaming=True)
    with pytest.raises(TypeError):
        data.count_tokens(data.pack_dataset(streamed, tok, 4))
