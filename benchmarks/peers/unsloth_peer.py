"""Unsloth QLoRA (FastLanguageModel, 4-bit) on lit_mistral's work, with Unsloth's own checkpointing or without.

Set up as Unsloth's documentation says for speed:
- `FastLanguageModel.from_pretrained(..., load_in_4bit=True)` and `FastLanguageModel.get_peft_model(r=8,
  lora_alpha=16, the seven projections, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth")`:
  "lora_dropout = 0 # Supports any, but = 0 is optimized", "bias = "none" # Supports any, but = "none" is
  optimized", `"unsloth"` checkpointing "uses 30% less VRAM" (the notebooks' get_peft_model cell, as in the
  README of https://github.com/unslothai/unsloth and Unsloth's fine-tuning guide). `--checkpointing false` is the
  same with `use_gradient_checkpointing=False`.
- Padding-free rows through its patched TRL SFTTrainer: "auto padding-free uncontaminated packing ... for all fast
  attention backends (FlashAttention 3, xFormers, SDPA)" (Unsloth docs, "3x Faster LLM Training with Unsloth Kernels
  + Packing", https://unsloth.ai/docs/blog/3x-faster-training-packing). The rows are TRL's packed layout
  (`input_ids` + `seq_lengths`) filled with lit_mistral's batches, in its order; Unsloth reads `seq_lengths` into
  its `packed_seq_lengths` (unsloth/utils/packing.py) and runs each example's attention apart. Unsloth keeps
  padding-free on for such a pre-tokenized split only when the split claims its width (`common.sft_train` says how);
  the `# trainer:` line and `settings.packing` say what it ran.
- Attention backend: Unsloth picks flash-attn, else xformers, else SDPA (unsloth/utils/attention_dispatch.py,
  select_attention_backend). flash-attn has no wheel for this torch; Unsloth refuses the xformers 0.0.35 wheel
  because it was built for another torch, so it runs on SDPA. The `# unsloth attention:` line says which backend it
  found.
- Its defaults otherwise: NF4 with double quantization (what `load_in_4bit=True` gives), bf16.

    python benchmarks/peers/unsloth_peer.py --model /tmp/mistral7b-random [--checkpointing false] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--checkpointing", choices=["unsloth", "false"], default="unsloth",
                   help='use_gradient_checkpointing: "unsloth" (its offloaded checkpointing) or false')
    args = p.parse_args()
    common.check(args)
    mode = "checkpointing-unsloth" if args.checkpointing == "unsloth" else "no-checkpointing"
    if args.dry_run:
        common.dry_run("unsloth", args, common.batches(args), dict(mode=mode))
        return
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as they load)
    from unsloth import FastLanguageModel

    import torch
    from unsloth.utils import attention_dispatch

    steps = common.batches(args)
    common.make_checkpoint(args.model, args.tokenizer)
    clock = common.Clock(steps)
    common.report_if_stopped("unsloth", mode, args, clock)
    checkpointing = "unsloth" if args.checkpointing == "unsloth" else False
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=args.max_tokens,
                                                         dtype=torch.bfloat16, load_in_4bit=True,
                                                         use_gradient_checkpointing=checkpointing)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=common.TARGETS, use_gradient_checkpointing=checkpointing,
                                             random_state=common.SEED, max_seq_length=args.max_tokens)
    backend = dict(flash_attn=attention_dispatch.HAS_FLASH_ATTENTION, xformers=attention_dispatch.HAS_XFORMERS,
                   packed_backend=attention_dispatch.select_attention_backend(use_varlen=True))
    print("# unsloth attention:", backend, flush=True)
    try:
        padding_free = common.sft_train(model, tokenizer, steps, clock, args)
    except torch.OutOfMemoryError as err:
        common.oom_row("unsloth", mode, args, clock, err)
        sys.exit(3)
    clock.report("unsloth", mode, args, common.versions("unsloth", "unsloth_zoo", "trl", "xformers", "datasets"),
                 dict(use_gradient_checkpointing=args.checkpointing, lora_dropout=0, attention=backend,
                      double_quant=True,
                      packing="padding_free" if padding_free else "padded rows (Unsloth turned padding-free off)"))


if __name__ == "__main__":
    main()
