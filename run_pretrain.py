"""Pre-train LLaMA / Qwen2MoE with AdamPower, MuonPower or a baseline, the GradPower paper's way.

    python run_pretrain.py                                  # tiny LLaMA, embedded C4 sample, AdamPower, CPU
    python run_pretrain.py --optim adamw --schedule wsd     # the baseline, warmup-stable-decay
    accelerate launch run_pretrain.py --recipe c4 --model_config llama-0.2b --optim adampower
    python run_pretrain.py my_run.yaml --max_steps 100      # file, then flag overrides

All transformers TrainingArguments pass through (--report_to tensorboard, --bf16, --save_steps, ...).
Bad input is one `run_pretrain.py: error: ...` line; HF_GRADPOWER_DEBUG=1 shows its traceback.
"""

import sys

from hf_gradpower.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
