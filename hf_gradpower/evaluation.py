"""Zero-shot evaluation of checkpoints with lm-eval, side by side, the paper's way (``run_eval.py``,
installed as ``hf-gradpower-eval``).

Each checkpoint is scored by lm-eval's own HF model (``simple_evaluate(model="hf", ...)``); the table takes
lm-eval's numbers as they are (never re-scored): one row per task plus the average, one column per checkpoint
(labelled from ``gradpower.json``), and a Gain column for each checkpoint after the first (the baseline).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hf_gradpower.model_card import RUN_INFO_FILE, label_of, with_eval_results

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "winogrande", "piqa")
# Tiny offline tasks shipped with the package (hand-written items in the tasks' schemas), always registered.
EXAMPLE_TASKS = ("arc_tiny", "hellaswag_tiny", "piqa_tiny")
EXAMPLE_TASKS_DIR = Path(__file__).resolve().parent / "resources" / "lm_eval_tasks"
METRICS = ("acc", "acc_norm")
FALLBACK_MARK = "*"  # a row whose task has no acc_norm and reports acc instead
CARD_SECTION = "## Zero-shot evaluation"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder",
                   "audiofolder"}
_TASK_MANAGERS: dict = {}
_EXAMPLE_DIR: list[str] = []


@dataclass
class Checkpoint:
    path: Path
    label: str
    info: dict = field(default_factory=dict)


def example_task_dir() -> str:
    """The shipped example tasks, ready for lm-eval: their YAML templates with ``@DATA_DIR@`` filled in.

    lm-eval hands ``data_files`` to ``datasets`` as is (relative paths would follow the working directory),
    so the absolute path of the installed package goes in; written once per process to a temporary folder.
    """
    if not _EXAMPLE_DIR:
        folder = tempfile.mkdtemp(prefix="hf_gradpower_tasks_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for template in sorted(EXAMPLE_TASKS_DIR.glob("*.yaml.in")):
            text = template.read_text().replace("@DATA_DIR@", str(EXAMPLE_TASKS_DIR))
            (Path(folder) / template.name.removesuffix(".in")).write_text(text)
        _EXAMPLE_DIR.append(folder)
    return _EXAMPLE_DIR[0]


def task_manager(include_path: str | list[str] | None = None):
    """``lm_eval.tasks.TaskManager`` for ``include_path`` plus the shipped example tasks, built once per process
    (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    key = tuple(paths)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=[*paths, example_task_dir()])
    return _TASK_MANAGERS[key]


def check_limit(limit) -> None:
    """``--limit``: a positive number of examples, or a fraction in (0, 1)."""
    if limit is None:
        return
    whole = isinstance(limit, int) or float(limit).is_integer()
    if isinstance(limit, bool) or not limit > 0 or (not whole and limit >= 1):
        raise ValueError(f"--limit {limit:g}: give a positive number of examples per task, or a fraction below 1")


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if tasks is None:
        return list(PAPER_TASKS)
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ValueError("--tasks is empty: give a comma list of lm-eval task names, e.g. --tasks arc_easy,piqa")
    return names


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Check a checkpoint folder (without loading it) and label it from ``gradpower.json``."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint folder {str(p)!r} does not exist: pass the output_dir of a run_pretrain.py run")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is not a folder: pass a checkpoint folder (with config.json and weights)")
    missing = [] if (p / "config.json").is_file() else ["config.json"]
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        missing.append("weights (model.safetensors)")
    if missing:
        raise ValueError(
            f"{str(p)!r} is not a model checkpoint (no {' and no '.join(missing)}): pass a folder written by "
            "run_pretrain.py / save_pretrained"
        )
    info = {}
    if (p / RUN_INFO_FILE).is_file():
        info = json.loads((p / RUN_INFO_FILE).read_text())
    label = label_of(info) if info.get("optim") else p.resolve().name
    return Checkpoint(p, label, info)


def _hub_dataset_cached(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        from datasets.config import HF_DATASETS_CACHE
    except Exception:  # pragma: no cover - datasets always has it
        HF_DATASETS_CACHE = Path.home() / ".cache" / "huggingface" / "datasets"
    hub = Path(HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--"))
    ds = Path(HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub.exists() or ds.exists()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_tasks(tasks: list[str], tm) -> None:
    """Unknown task names and (offline, best effort) hub datasets missing from the local cache."""
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: check the names (`lm-eval ls tasks`) or pass the "
            "folder of your task YAMLs with --include_path"
        )
    if not _offline():
        return
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # pragma: no cover - other lm-eval versions: skip the best-effort check
        return
    for name in tasks:
        entry = tm.task_index.get(name)
        if entry is None or getattr(entry, "yaml_path", None) is None or entry.kind.name != "TASK":
            continue
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
        except Exception:
            continue
        ds = cfg.get("dataset_path")
        if not isinstance(ds, str) or ds in _LOCAL_BUILDERS or Path(ds).exists():
            continue
        if not _hub_dataset_cached(ds):
            raise ValueError(
                f"task {name}: its dataset {ds!r} is not in the local Hugging Face cache and downloads are off "
                "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): run once online to cache it, or use a local task via "
                "--include_path"
            )


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def evaluate_checkpoint(ckpt: Checkpoint, tasks: list[str], tm, *, num_fewshot: int = 0, limit=None,
                        batch_size="auto", device: str = "cpu", dtype: str = "float32") -> dict:
    """lm-eval's ``simple_evaluate`` on one checkpoint; returns its results dict (JSON-serialisable parts)."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={ckpt.path},dtype={dtype}", tasks=tasks, task_manager=tm,
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, log_samples=False,
    )
    return out


def _value(res: dict, metric: str):
    v = res.get(f"{metric},none")
    se = res.get(f"{metric}_stderr,none")
    return (v if isinstance(v, (int, float)) else None), (se if isinstance(se, (int, float)) else None)


def _row_metric(task_results: list[dict], metric: str) -> str:
    """``metric``, or ``acc`` (marked) for ``acc_norm`` on a task that reports only ``acc`` (e.g. WinoGrande)."""
    if metric == "acc_norm" and all(_value(r, "acc_norm")[0] is None and _value(r, "acc")[0] is not None
                                    for r in task_results):
        return "acc" + FALLBACK_MARK
    return metric


def build_table(checkpoints: list[Checkpoint], results: list[dict], tasks: list[str], metric: str = "acc") -> dict:
    """Rows = tasks (lm-eval's order of names requested) + Average; values are lm-eval's, as fractions.

    With ``acc_norm``, a task that has none (WinoGrande) shows its ``acc``, marked ``acc*`` with a footnote,
    and the Average takes it, as the paper's tables do, instead of turning n/a.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown --metric {metric!r}: use one of {', '.join(METRICS)}")
    labels = [c.label for c in checkpoints]
    rows = []
    for task in tasks:
        per_ckpt = [res["results"].get(task, {}) for res in results]
        row_metric = _row_metric(per_ckpt, metric)
        cells = []
        for r in per_ckpt:
            v, se = _value(r, row_metric.rstrip(FALLBACK_MARK))
            cells.append({"value": v, "stderr": se})
        rows.append({"task": task, "metric": row_metric, "cells": cells})
    avg_cells = []
    for i in range(len(checkpoints)):
        vals = [row["cells"][i]["value"] for row in rows]
        avg_cells.append({"value": sum(vals) / len(vals) if vals and None not in vals else None, "stderr": None})
    marked = any(row["metric"].endswith(FALLBACK_MARK) for row in rows)
    rows.append({"task": "Average", "metric": metric + (FALLBACK_MARK if marked else ""), "cells": avg_cells})
    for row in rows:
        base = row["cells"][0]["value"]
        row["gain"] = [
            (c["value"] - base) if base is not None and c["value"] is not None else None for c in row["cells"][1:]
        ]
    footnote = f"{FALLBACK_MARK} acc: the task reports no acc_norm" if marked else None
    return {"labels": labels, "checkpoints": [str(c.path) for c in checkpoints], "metric": metric, "rows": rows,
            "footnote": footnote}


def _pct(v, se=None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")


def _gain(g) -> str:
    return "n/a" if g is None else f"{100 * g:+.2f}"


def _header(table: dict) -> list[str]:
    labels = table["labels"]
    gains = ["Gain"] if len(labels) == 2 else [f"Gain ({lab})" for lab in labels[1:]]
    return ["Dataset", "Metric", *labels, *gains]


def table_rows(table: dict) -> list[list[str]]:
    return [[row["task"], row["metric"], *(_pct(c["value"], c["stderr"]) for c in row["cells"]),
             *(_gain(g) for g in row["gain"])] for row in table["rows"]]


def to_markdown(table: dict) -> str:
    header = _header(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(table)]
    if table.get("footnote"):
        lines += ["", table["footnote"].replace(FALLBACK_MARK, "\\" + FALLBACK_MARK, 1)]
    return "\n".join(lines) + "\n"


def to_text(table: dict) -> str:
    header, rows = _header(table), table_rows(table)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def fmt(r):
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))

    lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(lines + ([table["footnote"]] if table.get("footnote") else [])) + "\n"


def write_csv(table: dict, path: Path) -> None:
    """Numbers in percent (full precision), stderr in its own columns."""
    labels = table["labels"]
    header = ["dataset", "metric"]
    for lab in labels:
        header += [lab, f"{lab} stderr"]
    header += [f"gain {lab}" for lab in labels[1:]]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in table["rows"]:
            line = [row["task"], row["metric"]]
            for c in row["cells"]:
                line += ["" if c["value"] is None else 100 * c["value"],
                         "" if c["stderr"] is None else 100 * c["stderr"]]
            line += ["" if g is None else 100 * g for g in row["gain"]]
            w.writerow(line)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "checkpoint"


def write_outputs(table: dict, results: list[dict], checkpoints: list[Checkpoint], output_dir) -> dict[str, Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "zero_shot.md", "csv": out / "zero_shot.csv", "json": out / "zero_shot.json"}
    paths["markdown"].write_text(to_markdown(table))
    write_csv(table, paths["csv"])
    paths["json"].write_text(json.dumps(table, indent=1))
    for i, (ckpt, res) in enumerate(zip(checkpoints, results, strict=True)):
        p = out / f"lm_eval_{i}_{_slug(ckpt.path.resolve().name)}.json"
        p.write_text(json.dumps(res, indent=1, default=str))
        paths[f"lm_eval_{i}"] = p
    return paths


def card_section(table: dict, tasks_note: str = "") -> str:
    body = (f"{CARD_SECTION}\n\nZero-shot accuracy (%, lm-eval's `{table['metric']}` ± stderr; "
            f"Gain vs {table['labels'][0]}){tasks_note}.\n\n" + to_markdown(table))
    return body


def card_scores(table: dict, column: int) -> list[tuple[str, str, float]]:
    """(task, metric, value in %) of one checkpoint's column, for the card's ``model-index``."""
    return [(row["task"], row["metric"].rstrip(FALLBACK_MARK), 100 * row["cells"][column]["value"])
            for row in table["rows"] if row["task"] != "Average" and row["cells"][column]["value"] is not None]


def update_model_card(ckpt_dir: str | Path, section: str, scores: list[tuple[str, str, float]] = ()) -> Path:
    """Append the section to README.md, or replace an earlier one (up to the next ``## `` heading); with
    ``scores``, the card's front matter gets them as ``model-index`` results."""
    readme = Path(ckpt_dir) / "README.md"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(rf"^{re.escape(CARD_SECTION)}\s*$.*?(?=^## |\Z)", re.S | re.M)
    block = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    if scores:
        text = with_eval_results(text, Path(ckpt_dir).resolve().name, list(scores))
    readme.write_text(text)
    return readme


def push_model_card(readme: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=str(readme), path_in_repo="README.md", repo_id=repo_id,
                        commit_message="Add zero-shot evaluation (lm-eval)")


def hub_ids(checkpoints: list[Checkpoint], hub_model_id: str | None) -> list[str]:
    ids = [s.strip() for s in hub_model_id.split(",")] if hub_model_id else [c.info.get("hub_model_id") for c in
                                                                           checkpoints]
    if len(ids) != len(checkpoints) or not all(ids):
        raise ValueError(
            "--push_to_hub needs one Hub repo id per checkpoint: pass --hub_model_id user/a,user/b (in checkpoint "
            "order) or put \"hub_model_id\" in each gradpower.json"
        )
    return ids


def run(checkpoints: list[str], tasks=None, include_path=None, limit=None, num_fewshot: int = 0,
        batch_size="auto", device: str | None = None, dtype: str = "auto", output_dir="eval_results",
        metric: str = "acc", update_card: bool = False, push_to_hub: bool = False,
        hub_model_id: str | None = None, quiet: bool = False) -> dict:
    """Validate everything, evaluate each checkpoint, then print/write the table (and update the cards)."""
    if not checkpoints:
        raise ValueError("no checkpoint given: pass one or more checkpoint folders (the first is the baseline)")
    if metric not in METRICS:
        raise ValueError(f"unknown --metric {metric!r}: use one of {', '.join(METRICS)}")
    check_limit(limit)
    ckpts = [read_checkpoint(c) for c in checkpoints]
    task_names = parse_tasks(tasks)
    if include_path is not None:
        for p in [include_path] if isinstance(include_path, str) else include_path:
            if not Path(p).is_dir():
                raise ValueError(f"--include_path {p!r} is not a folder: pass the folder holding your task YAMLs")
    repo_ids = hub_ids(ckpts, hub_model_id) if push_to_hub else None
    tm = task_manager(include_path)
    check_tasks(task_names, tm)
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)

    results = []
    for ckpt in ckpts:
        res = evaluate_checkpoint(ckpt, task_names, tm, num_fewshot=num_fewshot, limit=limit,
                                  batch_size=batch_size, device=device, dtype=dtype)
        if res is None:  # under `accelerate launch`, lm-eval returns the results on the main process only
            continue
        results.append({k: v for k, v in res.items() if k != "samples"})
    if len(results) != len(ckpts):
        return {"table": None, "results": [], "paths": {}, "readmes": []}
    table = build_table(ckpts, results, task_names, metric)
    paths = write_outputs(table, results, ckpts, output_dir)
    if not quiet:
        print(to_text(table))
    readmes = []
    if update_card or push_to_hub:
        note = f", {num_fewshot}-shot" if num_fewshot else ""
        note += f", limit={limit}" if limit else ""
        section = card_section(table, note)
        readmes = [update_model_card(c.path, section, card_scores(table, i)) for i, c in enumerate(ckpts)]
    if push_to_hub:
        for readme, repo_id in zip(readmes, repo_ids, strict=True):
            push_model_card(readme, repo_id)
    return {"table": table, "results": results, "paths": paths, "readmes": readmes}


PROG = "run_eval.py"
USAGE = """Zero-shot tables of checkpoints with lm-eval, side by side, the paper's way.

    run_eval.py out/adamw out/adampower --limit 200
    run_eval.py outputs/llama-tiny-adampower-cos --tasks arc_tiny,hellaswag_tiny,piqa_tiny   # offline
    run_eval.py out/adamw out/adampower --tasks my_task --include_path my_tasks/ --update_model_card

The first checkpoint is the baseline (Gain columns). The tiny offline tasks arc_tiny, hellaswag_tiny and
piqa_tiny ship with the package and are always available. Installed as the command hf-gradpower-eval.
"""


def _limit(s: str):
    v = float(s)
    return int(v) if v >= 1 and v.is_integer() else v


def _batch(s: str):
    return s if s.startswith("auto") else int(s)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One ``run_eval.py: error: ...`` line, like every other bad input (no usage dump)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """``run_eval.py`` / ``hf-gradpower-eval``: exit status 0, or 2 with one error line for bad input."""
    ap = _Parser(prog=PROG, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint folders; the first is the baseline")
    ap.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma list of lm-eval task/group names")
    ap.add_argument("--include_path", default=None, help="folder of custom lm-eval task YAMLs")
    ap.add_argument("--limit", type=_limit, default=None, help="examples per task (int) or fraction (<1)")
    ap.add_argument("--num_fewshot", type=int, default=0)
    ap.add_argument("--batch_size", type=_batch, default="auto")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA if supported, else float32")
    ap.add_argument("--metric", choices=METRICS, default="acc")
    ap.add_argument("--output_dir", default="eval_results")
    ap.add_argument("--update_model_card", action="store_true", help="add the table to each README.md")
    ap.add_argument("--push_to_hub", action="store_true", help="update the cards and upload each README.md")
    ap.add_argument("--hub_model_id", default=None, help="comma list of Hub repo ids, one per checkpoint")
    args = ap.parse_args(argv)
    try:
        run(args.checkpoints, tasks=args.tasks, include_path=args.include_path, limit=args.limit,
            num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
            output_dir=args.output_dir, metric=args.metric, update_card=args.update_model_card,
            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
