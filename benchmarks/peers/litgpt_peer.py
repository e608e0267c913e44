"""LitGPT's `finetune_lora` with `--quantize bnb.nf4 --precision bf16-true`, on lit_mistral's work.

Set up as LitGPT's documentation and its recipe's defaults have it (litgpt/finetune/lora.py `setup`, LitGPT's
tutorials/finetune_lora.md and tutorials/quantize.md): the checkpoint converted with `litgpt convert_to_litgpt`
(`convert_hf_checkpoint`, offline from the random checkpoint's safetensors, with `--model_name Mistral-7B-v0.1`),
4-bit NF4 through Lightning Fabric's `BitsandbytesPrecision` in bf16, which makes the recipe use bitsandbytes'
`PagedAdamW` (its code gives no other optimizer with quantization) and a `StableEmbedding`; LoRA r=8 / alpha 16 on
the seven projections (`lora_query`, `lora_key`, `lora_value`, `lora_projection`, `lora_mlp`), LoRA dropout 0.05
(LitGPT's default and qlora-fast's), its linear warm-up and cosine schedule, the output head in chunks of 128
(`lm_head_chunk_size`) with its chunked cross-entropy, and no activation checkpointing (the recipe has none).
Training runs LitGPT's own `fit` loop, after its 2-batch sanity check; the final validation, the sample generation
and the LoRA merge at the end are left out (a benchmark keeps nothing).

Batches, the nearest LitGPT has to lit_mistral's: LitGPT has no packing; its data modules pad each micro-batch of
`micro_batch_size` examples to the longest of them and accumulate gradients over `global_batch_size` examples. So
the examples of lit_mistral's steps, in their order, are cut into micro-batches of `--micro_batch_size` (LitGPT's
collate function pads them), with `global_batch_size` the mean number of examples in lit_mistral's steps, rounded
to a multiple of the micro-batch: the steps hold the same examples until they drift by a few. tokens/s counts the
real tokens of each step (no padding). The recipe's default micro-batch is 1 example (no padding, a small forward
each); larger ones pad (`--dry-run` prints the share of padding).

    python benchmarks/peers/litgpt_peer.py --model /tmp/mistral7b-random [--micro_batch_size 4] [--dry-run]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "Mistral-7B-v0.1"  # LitGPT's config of the architecture


def examples(steps: list[dict]) -> list[dict]:
    """Each packed step's examples, in order: `input_ids` and `labels` (as lit_mistral labels them: -100 on the
    prompt; aligned with the inputs, as LitGPT's are)."""
    out = []
    for step in steps:
        start = 0
        for length in step["seq_lengths"]:
            out.append({"input_ids": step["input_ids"][start:start + length],
                        "labels": step["labels"][start:start + length]})
            start += length
    return out


def litgpt_steps(steps: list[dict], micro: int, count: int) -> tuple[int, list[list[dict]]]:
    """(global batch size, the first `count` steps as lists of their examples): the mean examples of lit_mistral's
    steps rounded to a multiple of `micro`, the examples taken in order."""
    mean = sum(len(s["seq_lengths"]) for s in steps) / len(steps)
    size = max(micro, round(mean / micro) * micro)
    flat = examples(steps)
    if len(flat) < size * count:
        sys.exit(f"error: {len(flat)} examples for {count} steps of {size}: lit_mistral's batches ran out")
    return size, [flat[i * size:(i + 1) * size] for i in range(count)]


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--micro_batch_size", type=int, default=1,
                   help="examples per micro-batch, padded to the longest (LitGPT's train.micro_batch_size; its "
                        "finetune_lora default is 1)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (LitGPT's default 0.05)")
    args = p.parse_args()
    common.check(args)
    if args.micro_batch_size < 1:
        sys.exit(f"error: --micro_batch_size {args.micro_batch_size}: expected >= 1")
    # a few steps more of lit_mistral's batches than are trained: rounding the global batch may take more examples
    wide = argparse.Namespace(**{**vars(args), "steps": args.steps + 3})
    size, groups = litgpt_steps(common.batches(wide), args.micro_batch_size, args.steps)
    steps = [{"tokens": sum(len(e["input_ids"]) for e in g), "examples": len(g)} for g in groups]
    micro = [g[i:i + args.micro_batch_size] for g in groups for i in range(0, size, args.micro_batch_size)]
    padded = sum(len(m) * max(len(e["input_ids"]) for e in m) for m in micro)
    layout = dict(global_batch_size=size, micro_batch_size=args.micro_batch_size,
                  padding_share=round(1 - sum(s["tokens"] for s in steps) / padded, 3))
    if args.dry_run:
        for i, s in enumerate(steps, 1):
            print(json.dumps(dict(step=i, **s)))
        print(json.dumps(dict(peer="litgpt", dry_run=True, steps=len(steps), **layout)), flush=True)
        return
    train(args, size, groups, steps, layout)


def train(args, size: int, groups: list[list[dict]], steps: list[dict], layout: dict) -> None:
    import lightning as L
    import torch
    from lightning.fabric.plugins import BitsandbytesPrecision
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data.base import get_sft_collate_fn
    from litgpt.finetune import lora as recipe
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from litgpt.utils import instantiate_bnb_optimizer, load_checkpoint

    common.make_checkpoint(args.model, args.tokenizer)
    folder = Path(args.model)
    converted = None
    if not (folder / "lit_model.pth").is_file():  # `litgpt convert_to_litgpt`, once
        started = time.perf_counter()
        convert_hf_checkpoint(checkpoint_dir=folder, model_name=NAME)
        converted = round(time.perf_counter() - started, 1)

    def item(e: dict) -> dict:
        return {"input_ids": torch.tensor(e["input_ids"]), "labels": torch.tensor(e["labels"]),
                "token_counts": {"raw": len(e["input_ids"]), "raw_plus_prompt_template": len(e["input_ids"])}}

    train_items = [item(e) for g in groups for e in g]
    collate = get_sft_collate_fn(pad_id=0, ignore_index=-100)
    loader = torch.utils.data.DataLoader(train_items, batch_size=args.micro_batch_size, shuffle=False,
                                         collate_fn=collate)
    val_loader = torch.utils.data.DataLoader(train_items[:2 * args.micro_batch_size], batch_size=args.micro_batch_size,
                                             collate_fn=collate)
    clock = common.Clock(steps)
    common.report_if_stopped("litgpt", "bnb.nf4", args, clock)
    fabric = L.Fabric(devices=1, precision=None, plugins=BitsandbytesPrecision("nf4", torch.bfloat16), loggers=[])
    fabric.launch()
    fabric.seed_everything(common.SEED)
    config = Config.from_file(folder / "model_config.yaml", lora_r=8, lora_alpha=16, lora_dropout=args.lora_dropout,
                              lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True,
                              lora_head=False)
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model)
    # as the recipe's `main` does under BitsandbytesPrecision
    optimizer = instantiate_bnb_optimizer(
        {"class_path": "torch.optim.AdamW",
         "init_args": {"lr": common.LEARNING_RATE, "weight_decay": common.WEIGHT_DECAY}}, model.parameters())
    from bitsandbytes.nn import StableEmbedding

    old = model.transformer.wte
    model.transformer.wte = StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(old.weight)
    model.transformer.wte = model.transformer.wte.to(device=old.weight.device, dtype=old.weight.dtype)
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = recipe.get_lr_scheduler(optimizer, warmup_steps=common.WARMUP_STEPS, max_steps=args.steps)
    load_checkpoint(fabric, model, folder / "lit_model.pth", strict=False)
    loader, val_loader = fabric.setup_dataloaders(loader, val_loader)

    stepped = optimizer.step

    def step(*a, **k):  # the end of each optimizer step, timed
        out = stepped(*a, **k)
        clock.step_done()
        return out

    optimizer.step = step
    logged = fabric.log_dict

    def log_dict(metrics, step=None):  # the recipe's running loss over a step's micro-batches, at its last one
        if "loss" in metrics and metrics.get("step", 0) > len(clock.losses):
            clock.loss(metrics["step"], metrics["loss"])
        return logged(metrics, step=step)

    fabric.log_dict = log_dict
    train_args = TrainArgs(save_interval=None, log_interval=1, global_batch_size=size,
                           micro_batch_size=args.micro_batch_size, lr_warmup_steps=common.WARMUP_STEPS, epochs=1000,
                           max_steps=args.steps, max_seq_length=None)
    eval_args = EvalArgs(interval=10**9, max_iters=2, initial_validation=False, final_validation=False)
    try:
        recipe.fit(fabric=fabric, model=model, optimizer=optimizer, scheduler=scheduler, train_dataloader=loader,
                   val_dataloader=val_loader, devices=1, checkpoint_dir=folder, out_dir=Path("/tmp/litgpt-peer-out"),
                   train=train_args, eval=eval_args, data=None)
    except torch.OutOfMemoryError as err:
        common.oom_row("litgpt", "bnb.nf4", args, clock, err)
        sys.exit(3)
    clock.report("litgpt", "bnb.nf4", args, common.versions("litgpt", "lightning"),
                 dict(layout, quantize="bnb.nf4", precision="bf16-true", optimizer="bitsandbytes PagedAdamW",
                      lora_dropout=args.lora_dropout, activation_checkpointing=False, lm_head_chunk_size=128,
                      attention="torch SDPA (causal, padded rows)", convert_s=converted))


if __name__ == "__main__":
    main()
