"""GradPower with TRL's SFTTrainer (or any other Trainer subclass): one mixin, one config class.

    python examples/trl_sft.py --model_name_or_path HuggingFaceTB/SmolLM2-135M --output_dir out/sft --optim adampower
    python examples/trl_sft.py --model_name_or_path gpt2 --output_dir out/sft-muon --optim muonpower --gradpower_p 1.1

``GradPowerMixin`` goes first in the bases, so its ``create_optimizer`` and clipping hook run in place of the
Trainer's; ``GradPowerTrainingArguments`` first in the config's bases adds ``--optim adampower`` and the
``--gradpower_*`` flags to TRL's own. Data: the C4 sample shipped with the package, as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer, TrlParser

from hf_gradpower import GradPowerMixin, GradPowerTrainingArguments
from hf_gradpower.data_sources import load_text_dataset


class GradPowerSFTTrainer(GradPowerMixin, SFTTrainer):
    pass


@dataclass
class GradPowerSFTConfig(GradPowerTrainingArguments, SFTConfig):
    pass


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        metadata={"help": "a Hub id or a local folder with a causal LM and its tokenizer"}
    )
    dataset: str = field(
        default="embedded", metadata={"help": "embedded (the shipped C4 sample) or local files"}
    )


def main(argv: list[str] | None = None) -> GradPowerSFTTrainer:
    script, args = TrlParser((ScriptArguments, GradPowerSFTConfig)).parse_args_and_config(argv)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    trainer = GradPowerSFTTrainer(
        model=model, args=args, train_dataset=load_text_dataset(script.dataset), processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model()
    print(
        f"trained with --optim {args.optim} (p = {args.gradpower_p}); model in {args.output_dir}", flush=True
    )
    return trainer


if __name__ == "__main__":
    main()
