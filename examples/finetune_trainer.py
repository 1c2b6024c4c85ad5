"""Fine-tune a small causal LM with GradPowerTrainer on the C4 sample shipped with the package.

    python examples/finetune_trainer.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --output_dir out/smol
    python examples/finetune_trainer.py --model_name_or_path gpt2 --optim adamw --output_dir out/gpt2-adamw

Every ``TrainingArguments`` flag works, plus GradPower's: ``--optim adampower|muonpower|sgdpower|...``,
``--gradpower_p 1.2`` (or a schedule), ``--gradpower_order before_clip|after_clip``. The only change from a
plain Trainer script is ``GradPowerTrainer`` / ``GradPowerTrainingArguments`` in place of Trainer's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_gradpower import GradPowerTrainer, GradPowerTrainingArguments
from hf_gradpower.data import build_datasets


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        metadata={"help": "a Hub id or a local folder with a causal LM and its tokenizer"}
    )
    dataset: str = field(
        default="embedded",
        metadata={
            "help": "embedded (the shipped C4 sample), a Hub name "
            "(c4, openwebtext) or local .txt/.jsonl/.parquet"
        },
    )
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training block"})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ScriptArguments, GradPowerTrainingArguments))
    script, args = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    train, evaluation = build_datasets(
        script.dataset, tokenizer, script.seq_len, eval_docs=20, seed=args.seed
    )
    trainer = GradPowerTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    print(f"eval loss {metrics['eval_loss']:.4f}; model in {args.output_dir}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
