"""Zero-shot tables of checkpoints with lm-eval, side by side, the paper's way.

    python run_eval.py out/adamw out/adampower --limit 200
    python run_eval.py outputs/llama-tiny-adampower-cos --tasks arc_tiny,hellaswag_tiny,piqa_tiny  # offline
    python run_eval.py out/adamw out/adampower --tasks my_task --include_path my_tasks/ --update_model_card

The first checkpoint is the baseline (Gain columns); logic in ``hf_gradpower.evaluation``. The tiny offline
tasks ``arc_tiny``, ``hellaswag_tiny`` and ``piqa_tiny`` ship with the package and are always available.
"""

from __future__ import annotations

import argparse
import sys

from hf_gradpower.evaluation import METRICS, PAPER_TASKS, run


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
    ap = _Parser(prog="run_eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        print(f"run_eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
