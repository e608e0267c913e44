"""TRL's SFTTrainer + peft QLoRA (bitsandbytes NF4) + Liger-Kernel + padding-free batches, on lit_mistral's work.

Set up as TRL's and Liger's documentation say for speed and memory:
- `use_liger_kernel=True` in SFTConfig, "no other changes are needed" (TRL docs, Liger Kernel Integration,
  https://huggingface.co/docs/trl/v1.14.0/liger_kernel_integration): Liger's RoPE, RMSNorm, SwiGLU and fused
  linear + cross-entropy replace Mistral's. The same page: "with this memory reduction, you can potentially turn off
  ... gradient checkpointing to further boost the performance" (--checkpointing false; SFTConfig's default is on).
  TRL 1.15 (the version carried) deprecates `use_liger_kernel` for the Hub's kernels (`model_init_kwargs=
  {"use_kernels": True}`, which cannot be fetched offline). With it, TRL applies Liger's layer kernels only and
  computes the loss through its own fused LM head, a chunked log-probability Triton kernel, in place of Liger's fused
  linear + cross-entropy (trl/trainer/sft_trainer.py). On the CPU (no Triton) the trainer builds with these
  settings, padding-free kept on, and stops at that kernel.
- `padding_free=True` (TRL docs, Reducing Memory Usage, "Padding-free",
  https://huggingface.co/docs/trl/v1.6.0/reducing_memory_usage): one row per step, `position_ids` restarting per
  example. The rows are TRL's packed layout (`input_ids` + `seq_lengths`, what `packing=True` stores), filled with
  lit_mistral's batches in its order; the collator is TRL's own.
- QLoRA as TRL's PEFT integration loads it: `BitsAndBytesConfig(load_in_4bit, nf4, bf16 compute)` and a LoraConfig
  (r=8, alpha 16, the seven projections) passed as `peft_config` (TRL prepares the 4-bit model for training).
- Attention: SDPA. TRL names FlashAttention variants as the ones known to handle padding-free rows; no flash-attn
  wheel exists for this torch (PyPI has only its source, which needs hours of CUDA compiling) and the hub kernels
  (`kernels-community/...`) cannot be fetched offline, so transformers builds a block-diagonal mask from the
  position ids and SDPA runs over the whole row with it (correct, more work than a varlen kernel).

    python benchmarks/peers/trl_liger.py --model /tmp/mistral7b-random [--checkpointing false] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--checkpointing", choices=["true", "false"], default="true",
                   help="activation checkpointing (SFTConfig's gradient_checkpointing; TRL's default is true)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (qlora-fast's 0.05 by default)")
    args = p.parse_args()
    common.check(args)
    mode = "checkpointing" if args.checkpointing == "true" else "no-checkpointing"
    steps = common.batches(args)
    if args.dry_run:
        common.dry_run("trl_liger", args, steps, dict(mode=mode))
        return
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    common.make_checkpoint(args.model, args.tokenizer)
    clock = common.Clock(steps)
    common.report_if_stopped("trl_liger", mode, args, clock)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=args.lora_dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=common.TARGETS)
    settings = dict(use_liger_kernel=True, gradient_checkpointing=args.checkpointing == "true",
                    gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        padding_free = common.sft_train(model, tokenizer, steps, clock, args, peft_config=lora, **settings)
    except torch.OutOfMemoryError as err:
        common.oom_row("trl_liger", mode, args, clock, err)
        sys.exit(3)
    clock.report("trl_liger", mode, args, common.versions("trl", "liger-kernel", "accelerate", "datasets"),
                 dict(settings, attn="sdpa", lora_dropout=args.lora_dropout, double_quant=False,
                      packing="padding_free" if padding_free else "padded rows (the trainer turned padding-free off)",
                      gradient_checkpointing_kwargs=None))


if __name__ == "__main__":
    main()
