"""What a finished run leaves beside its weights: metrics log (JSON, CSV), loss-curve plot, model card.

The card is the output directory's ``README.md``, so ``push_to_hub`` publishes it with the weights. Its YAML
front matter follows the Hub's model-card metadata (``huggingface_hub.ModelCardData``): ``library_name``,
``pipeline_tag``, tags (``gradpower``, the optimizer, the schedule, the paper), the dataset, and the training
recipe; ``run_eval.py --update_model_card`` adds the zero-shot scores as ``model-index`` results.
``gradpower.json`` holds the run's optimizer facts for tools (``run_eval.py`` labels columns with it).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

RUN_INFO_FILE = "gradpower.json"
PAPER = "2505.24275"
HUB_DATASET_IDS = {"embedded": "allenai/c4", "c4": "allenai/c4", "openwebtext": "Skylion007/openwebtext"}
LM_EVAL = ("lm-evaluation-harness", "https://github.com/EleutherAI/lm-evaluation-harness")


def write_metrics(log_history: list[dict], output_dir: str | Path) -> tuple[Path, Path]:
    """``metrics.json`` (Trainer's log history as is) and ``metrics.csv`` (one row per logged step)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "metrics.json", out / "metrics.csv"
    json_path.write_text(json.dumps(log_history, indent=1))
    keys = sorted({k for row in log_history for k in row}, key=lambda k: (k != "step", k))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(log_history)
    return json_path, csv_path


def loss_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series for train ``loss`` and ``eval_loss``."""
    return {
        key: [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        for key in ("loss", "eval_loss")
    }


def plot_loss(log_history: list[dict], path: str | Path, title: str) -> Path:
    """Train and eval loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(log_history)
    noise = [(r["step"], r["noise/b_simple"]) for r in log_history if "noise/b_simple" in r and "step" in r]
    fig, axes = plt.subplots(2 if noise else 1, 1, figsize=(6.4, 6.4 if noise else 4.0), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o-")):
        if curves[key]:
            steps, values = zip(*curves[key], strict=True)
            ax.plot(steps, values, style, label=label, markersize=3)
    ax.set(xlabel="step", ylabel="cross-entropy loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if noise:
        plot_noise_panel(axes[1, 0], log_history)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_noise_panel(ax, log_history: list[dict]) -> None:
    """Gradient noise scale B_simple (log axis) and, on a second axis, the GradPower p in force."""
    rows = [r for r in log_history if "noise/b_simple" in r and "step" in r]
    ax.plot([r["step"] for r in rows], [r["noise/b_simple"] for r in rows], color="tab:purple")
    ax.set(xlabel="step", ylabel="noise scale B_simple (sequences)")
    if all(r["noise/b_simple"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    p_rows = [r for r in log_history if "gradpower_p" in r and "step" in r]
    if p_rows:
        twin = ax.twinx()
        twin.plot([r["step"] for r in p_rows], [r["gradpower_p"] for r in p_rows], color="tab:green")
        twin.set_ylabel("GradPower p (mean over parameters)", color="tab:green")


def write_model_card(output_dir: str | Path, run_info: dict, log_history: list[dict]) -> Path:
    """Write ``README.md`` (model card), ``gradpower.json``, the metrics and ``loss_curve.png``."""
    out = Path(output_dir)
    write_metrics(log_history, out)
    curves = loss_curves(log_history)
    final = {key: (series[-1][1] if series else None) for key, series in curves.items()}
    info = {**run_info, "final_train_loss": final["loss"], "final_eval_loss": final["eval_loss"]}
    (out / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))
    optimizer_label = label_of(info)
    plot_loss(log_history, out / "loss_curve.png", f"{info.get('model_config', '')} / {optimizer_label}")

    def fmt(key, v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}" if "loss" in key else f"{v:g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    rows = [
        ("architecture", info.get("architecture")), ("model config", info.get("model_config")),
        ("parameters", info.get("parameters")), ("optimizer", optimizer_label),
        ("GradPower p", info.get("gradpower_p")), ("GradPower order", info.get("gradpower_order")),
        ("schedule", info.get("schedule")), ("peak lr", info.get("learning_rate")),
        ("dataset", info.get("dataset")), ("tokenizer", info.get("tokenizer")),
        ("sequence length", info.get("seq_len")), ("global batch (sequences)", info.get("global_batch")),
        ("steps", info.get("max_steps")), ("tokens seen", info.get("tokens")),
        ("final train loss", final["loss"]), ("final eval loss", final["eval_loss"]),
    ]
    table = "\n".join(f"| {k} | {fmt(k, v)} |" for k, v in rows)
    body = f"""
# {info.get("model_config", "model")} pre-trained with {optimizer_label}

Pre-trained from scratch with GradPower ([arXiv {PAPER}](https://arxiv.org/abs/{PAPER})) through the
`hf_gradpower` package: every gradient element is replaced by `sign(g) * |g|^p` before the base optimizer
step.

| | |
|---|---|
{table}

![loss curve](loss_curve.png)

Metrics per logged step: `metrics.json`, `metrics.csv`. Run facts: `{RUN_INFO_FILE}`.
"""
    card = ModelCard(f"---\n{card_metadata(info).to_yaml()}\n---\n{body}")
    path = out / "README.md"
    path.write_text(str(card))
    return path


def card_metadata(info: dict) -> ModelCardData:
    """The Hub metadata of a run: library, task, tags, dataset, and the recipe it was trained with."""
    optim = str(info.get("optim", ""))
    tags = ["gradpower", optim, "pre-training", f"arxiv:{PAPER}"]
    if info.get("schedule"):
        tags.append(f"{info['schedule']}-schedule")
    recipe = {key: info[key] for key in ("recipe", "model_config", "optim", "gradpower_p", "gradpower_order",
                                         "schedule", "learning_rate", "seq_len", "global_batch", "max_steps",
                                         "tokens") if info.get(key) is not None}
    dataset = HUB_DATASET_IDS.get(str(info.get("dataset")))
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=[t for t in dict.fromkeys(tags) if t], datasets=[dataset] if dataset else None,
                         training_recipe=recipe)


def with_eval_results(card_text: str, model_name: str, scores: list[tuple[str, str, float]]) -> str:
    """``card_text`` with its ``model-index`` set to ``scores`` (task, metric, value in %), from lm-eval."""
    card = ModelCard(card_text, ignore_metadata_errors=True)
    card.data.model_name = card.data.model_name or model_name
    card.data.eval_results = [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                   metric_value=round(value, 2), source_name=LM_EVAL[0], source_url=LM_EVAL[1])
        for task, metric, value in scores
    ] or None
    return str(card)


def label_of(info: dict) -> str:
    """Paper-style optimizer label: ``AdamW``, ``AdamPower(p=1.2)``, ``MuonPower(p=1.2)``, ``SGDPower(p=1.5)``.

    ``gradpower_p`` is recorded only for runs whose optimizer applied GradPower, so it alone decides the suffix.
    """
    names = {"adamw": "AdamW", "adampower": "AdamPower", "muon": "Muon", "muonpower": "MuonPower"}
    optim = str(info.get("optim", "?"))
    label = names.get(optim, optim)
    p = info.get("gradpower_p")  # recorded only for runs that used GradPower
    if p is not None:
        label = f"{label}(p={p:g})" if isinstance(p, (int, float)) else f"{label}(p={p})"
    return label
