"""Zero-shot tables of checkpoints with lm-eval, side by side, the paper's way.

    python run_eval.py out/adamw out/adampower --limit 200
    python run_eval.py outputs/llama-tiny-adampower-cos --tasks arc_tiny,hellaswag_tiny,piqa_tiny  # offline
    python run_eval.py out/adamw out/adampower --tasks my_task --include_path my_tasks/ --update_model_card

The first checkpoint is the baseline (Gain columns). Installed as the command ``hf-gradpower-eval``; the
logic is in ``hf_gradpower.evaluation``.
"""

import sys

from hf_gradpower.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
