"""Training throughput of lit_mistral on one GPU: Mistral-7B QLoRA (NF4 base, LoRA r=8 on q,k,v,o,gate,up,down
and lm_head, dropout 0.05, paged AdamW 32-bit, bf16-mixed), on the real Dolly records formatted with the mistral
prompt and tiled, through the real code path (InstructionDataModule, QLoRAModule, Lightning's Trainer).

Same workload as ../shared/bench/seed_recipe.py: same random-weight checkpoint (Mistral-7B-v0.1's exact config),
same LoRA targets, loss on every token (mask_prompt false, as the seed trains), rows cut at 512 tokens. Run both in
one device call (benchmarks/README.md) so the ratios are side by side.

The model loads once; variants then change the token budget, activation checkpointing and kernels in place.
Prints one JSON line per variant: non-pad tokens/s over the timed steps, MFU (4 x 7.24e9 FLOP per token, the frozen
base's forward + input-gradient backward, over the measured 790 TFLOP/s bf16 peak; recomputation not counted),
peak allocated GiB, mean loss.

    python benchmarks/train/bench_train.py --model $CKPT --data dolly.jsonl \
        --variants p8k:max_tokens=8192:ckpt=0 p16k_ckpt:max_tokens=16384:ckpt=32
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from lit_mistral.callbacks import Telemetry  # noqa: E402
from lit_mistral.config import LoRA, Optimization, Quantization  # noqa: E402
from lit_mistral.data.datamodule import InstructionDataModule  # noqa: E402
from lit_mistral.modeling.build import apply_kernels, set_checkpointing  # noqa: E402
from lit_mistral.module import QLoRAModule  # noqa: E402

PEAK_FLOPS = 790e12  # bf16 matmul rate measured on this H200 (../shared/bench/README.md)
PARAMS = 7.24e9
SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


CUDA = torch.cuda.is_available()  # the CPU path exists to check this script, not to measure


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Clock(Callback):
    """Times steps [warm, end) with device syncs; counts their non-pad tokens."""

    def __init__(self, warm: int) -> None:
        self.warm, self.tokens, self.t0, self.losses = warm, 0, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warm:
            sync()
            self.t0 = time.perf_counter()
        if batch_idx >= self.warm:
            self.tokens += batch["num_tokens"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        sync()
        self.seconds = time.perf_counter() - self.t0


def tiled_records(path: str, n: int, out: Path) -> Path:
    rows = Path(path).read_text().splitlines()
    out.write_text("\n".join(rows[i % len(rows)] for i in range(n)) + "\n")
    return out


def run_variant(module, name, opts, data_file, steps, warm, tokenizer_dir):
    max_tokens = int(opts.get("max_tokens", 0)) or None
    layers = int(opts.get("ckpt", 0))  # decoder layers recomputed in backward (0: none)
    liger = opts.get("liger") == "1"
    bf16_norms = opts.get("r16") == "1"  # norms/embeddings (residual stream) in bf16: fp32_norms=false
    compute, quantization = module.spec.compute, module.spec.quantization
    first = module.model is None
    if first:  # the first variant: configure_model builds it with these settings
        compute.gradient_checkpointing = layers > 0
        compute.checkpoint_layers = layers or None
        compute.kernels = "liger" if liger else None
        quantization.fp32_norms = not bf16_norms
    else:  # later variants change the loaded model in place
        base = module.model.get_base_model()
        if layers:
            set_checkpointing(base, layers)
        else:
            base.gradient_checkpointing_disable()
        if liger and compute.kernels != "liger":  # one way: kernels stay for the variants after
            compute.kernels = "liger"
            apply_kernels(base)
        if bf16_norms and quantization.fp32_norms:  # one way too: what fp32_norms=false loads
            quantization.fp32_norms = False
            for p in base.parameters():
                if p.dtype == torch.float32 and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    dm = InstructionDataModule(path=str(data_file), tokenizer=tokenizer_dir, prompt_style="mistral",
                               mask_prompt=False, max_length=512, overlong="truncate",
                               batch_size=int(opts.get("bs", 4)),
                               packing=max_tokens is not None or opts.get("pack") == "1",
                               max_tokens=max_tokens, seed=0)
    clock, telemetry = Clock(warm), Telemetry()
    trainer = Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, precision="bf16-mixed" if CUDA else "32-true",
                      max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[clock, telemetry], use_distributed_sampler=False)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t_fit = time.perf_counter()
    trainer.fit(module, dm)
    tps = clock.tokens / clock.seconds
    result = dict(variant=name, **opts, steps_timed=steps - warm, tokens_per_s=round(tps),
                  mfu=round(tps * 4 * PARAMS / PEAK_FLOPS, 3), s_per_step=round(clock.seconds / (steps - warm), 3),
                  tokens_per_step=round(clock.tokens / (steps - warm)),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
                  loss=round(sum(clock.losses) / len(clock.losses), 3), fit_s=round(time.perf_counter() - t_fit, 1))
    if first:  # the first variant includes loading the model
        result["time_to_first_step_s"] = round(telemetry.last["train/time_to_first_step_s"], 1)
    del trainer, dm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def check_packing(module, data_file, tokenizer_dir):
    """Same batch, padded vs packed: the loss must agree (bf16 rounding aside)."""
    from lit_mistral.data.batching import collate_packed, collate_padded

    dm = InstructionDataModule(path=str(data_file), tokenizer=tokenizer_dir, mask_prompt=False, max_length=512,
                               overlong="truncate")
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(8)]
    to = lambda b: {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    module.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
        a, n = module.loss_sum(to(collate_padded(items, dm.tokenizer.pad_token_id, False)))
        b, m = module.loss_sum(to(collate_packed(items, False)))
    module.model.train()
    return dict(check="packed_vs_padded_loss", padded=round(float(a / n), 5), packed=round(float(b / m), 5),
                rel_diff=float(abs(a - b) / abs(a)), tokens=int(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder with config.json, weights and tokenizer")
    p.add_argument("--data", required=True, help="Dolly-format .jsonl to tile")
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    import bitsandbytes
    import peft
    import transformers

    print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                          bitsandbytes=bitsandbytes.__version__,
                          gpu=torch.cuda.get_device_name(0) if CUDA else "cpu")), flush=True)
    seed_everything(0)
    data_file = tiled_records(args.data, 6000, Path(tempfile.mkdtemp()) / "dolly-tiled.jsonl")
    module = QLoRAModule(name_or_path=args.model, quantization=Quantization(method="nf4"),
                         lora=LoRA(r=8, alpha=16, dropout=0.05, target_modules=SEED_TARGETS),
                         optimization=Optimization(optimizer="paged_adamw_32bit", learning_rate=2e-4,
                                                   weight_decay=0.001))
    results = []
    for spec in args.variants:
        name, *kv = spec.split(":")
        opts = dict(x.split("=") for x in kv)
        try:
            result = run_variant(module, name, opts, data_file, args.steps, args.warm, args.model)
        except Exception as err:  # one failing variant (OOM, say) must not cost the others
            traceback.print_exc()
            result = dict(variant=name, **opts, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        results.append(result)
        if len(results) == 1 and module.model is not None:
            try:
                print(json.dumps(check_packing(module, data_file, args.model)), flush=True)
            except Exception:
                traceback.print_exc()
    Path(args.out, "bench_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
