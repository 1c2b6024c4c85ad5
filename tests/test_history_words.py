"""Nothing shipped speaks of how the project was made: no work sessions, issue numbers or "the issue".

Shipped: the README, docs/ (with the generated reports), the package, benchmarks/ (with results/), configs/,
examples/, scripts/, the run_*.py scripts and pyproject.toml. History belongs in commit messages. Links to other
projects' threads stay allowed (``transformers#36749``, ``github.com/.../issues/36749``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [
    "README.md",
    "pyproject.toml",
    "docs",
    "hf_gradpower",
    "benchmarks",
    "configs",
    "examples",
    "scripts",
    *sorted(p.name for p in REPO.glob("run_*.py")),
]
TEXT_SUFFIXES = {".md", ".py", ".c", ".h", ".toml", ".yaml", ".yml", ".in", ".json", ".txt", ".cfg"}
DATA_DIRS = {"tokenizer-c4-4k", "tokenizer-gpt2", "__pycache__"}  # third-party vocabularies, not prose
HISTORY = re.compile(
    "|".join(
        [
            r"\bsessions?\b",
            r"\bissues? ?#?\d+",  # "issue 9", "issue #11"; not ".../issues/123" URLs
            r"\bthe issue\b",
            r"\bissue['’]s\b",
            r"(?<![\w/])#\d+\b",  # "#11"; not "transformers#36749"
            r"\bpredates?\b",
            r"\bprevious (?:session|round|run|figure|measurement|version)s?\b",
            r"\btried and not kept\b",
        ]
    ),
    re.I,
)


def _shipped_files() -> list[Path]:
    files = []
    for name in SHIPPED:
        root = REPO / name
        for f in [root] if root.is_file() else sorted(root.rglob("*")):
            if f.is_file() and f.suffix in TEXT_SUFFIXES and not DATA_DIRS & set(f.parts):
                files.append(f)
    return files


def history_lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if HISTORY.search(line)]


@pytest.mark.parametrize(
    "text, found",
    [
        ("measured in session 4", True),
        ("see issue 9", True),
        ("(comparisons 9-17, issue #11)", True),
        ("Issue 11's goal", True),
        ("the issue's AVX2-only EPYC", True),
        ("fixed in #12.", True),
        ("they predate this default", True),
        ("the previous session's run", True),
        ("SFTConfig rejects optimizers (transformers#36749)", False),
        ("https://github.com/huggingface/transformers/issues/36749", False),
        ("an issue with your data: one error line", False),
        ("color #1f77b4", False),
        ("# 1 thread", False),
    ],
)
def test_the_patterns_catch_history_and_spare_references(text, found):
    assert bool(history_lines(text)) == found


def test_no_shipped_file_speaks_of_how_it_was_made():
    files = _shipped_files()
    assert REPO / "README.md" in files and any(f.parent.name == "results" for f in files)
    offending = [
        f"{f.relative_to(REPO)}:{i}: {line[:120]}"
        for f in files
        for i, line in history_lines(f.read_text(errors="replace"))
    ]
    assert not offending, "history words in shipped files (move them to commit messages):\n" + "\n".join(
        offending
    )
