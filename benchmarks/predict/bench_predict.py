"""Generation throughput of lit_mistral's predict on one GPU: Mistral-7B (random weights, the real architecture)
with a LoRA adapter (random, non-zero) trained on an NF4 base, answering the first N Dolly instructions with
sampling (temperature 0.7, top-k 50, top-p 0.95, like ../shared/bench/seed_predict.py) and up to 256 new tokens,
through the real code path (InstructionDataModule predict split, QLoRAModule, Lightning's Trainer.predict, the JSONL
writer). Run it in the same device call as seed_predict.py (benchmarks/README.md).

Variants: `merged:batch=200` (adapter folded into dequantized bf16 weights, dynamic KV cache), `budget=N` (also
bound each batch to N key/value-cache positions: data.predict_max_tokens),
`adapter:batch=200` (4-bit base + LoRA), `merged:batch=200:cache=static` (static KV cache: transformers compiles
the decoding step). Prints one JSON line per variant: generated tokens/s over the generation itself (first batch to
last) and end to end (model load, merge and generation), peak GiB.
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

from lit_mistral.config import Generation, LoRA  # noqa: E402
from lit_mistral.data.datamodule import InstructionDataModule  # noqa: E402
from lit_mistral.module import QLoRAModule  # noqa: E402
from lit_mistral.predictions import JsonlPredictionWriter  # noqa: E402

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


CUDA = torch.cuda.is_available()  # the CPU path exists to check this script, not to measure
DEVICE = torch.device("cuda" if CUDA else "cpu")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class GenerationClock(Callback):
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            sync()
            self.t0, self.batches = time.perf_counter(), 0
        self.batches += 1

    def on_predict_end(self, trainer, pl_module):
        sync()
        self.seconds = time.perf_counter() - self.t0


def run(name: str, opts: dict, model_dir: str, questions: Path, new: int, out: Path) -> dict:
    started = time.perf_counter()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    module = QLoRAModule(name_or_path=model_dir, lora=LoRA(target_modules=SEED_TARGETS),
                         generation=Generation(weights="merged" if name == "merged" else "adapter",
                                               cache=opts.get("cache", "dynamic"), max_new_tokens=new, do_sample=True,
                                               temperature=0.7, top_k=50, top_p=0.95))
    module.build(DEVICE)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialization
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    budget = int(opts["budget"]) if "budget" in opts else None  # predict_max_tokens: KV-cache positions per batch
    dm = InstructionDataModule(predict_path=str(questions), tokenizer=model_dir, prompt_style="mistral",
                               predict_batch_size=int(opts.get("batch", 200)), predict_max_tokens=budget,
                               max_new_tokens=new)
    target = Path(tempfile.gettempdir()) / f"predictions-{name}-{'-'.join(f'{k}{v}' for k, v in opts.items())}.jsonl"
    writer, clock = JsonlPredictionWriter(path=str(target), overwrite=True), GenerationClock()
    trainer = Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, precision="bf16-mixed" if CUDA else "32-true",
                      logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[writer, clock])
    trainer.predict(module, dm, return_predictions=False)
    rows = [json.loads(line) for line in target.read_text().split("\n") if line]  # not splitlines: answers hold U+2028
    tokens = sum(r["response_tokens"] for r in rows)
    result = dict(variant=name, **opts, prompts=len(rows), new_tokens=tokens,
                  tokens_per_s=round(tokens / clock.seconds, 1), generation_s=round(clock.seconds, 1),
                  end_to_end_s=round(time.perf_counter() - started, 1),
                  end_to_end_tokens_per_s=round(tokens / (time.perf_counter() - started), 1),
                  batches=clock.batches,
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if CUDA else None,
                  finish=sorted({r["finish"] for r in rows}))
    del trainer, module, dm
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder with config.json, weights and tokenizer")
    p.add_argument("--data", required=True, help="Dolly-format .jsonl: the first --n instructions are asked")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["merged:batch=200"])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    seed_everything(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()][: args.n]
    questions = Path(tempfile.mkdtemp()) / "questions.jsonl"
    questions.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r["context"]}) + "\n"
                                 for r in rows))
    results = []
    for spec in args.variants:
        name, *kv = spec.split(":")
        opts = dict(x.split("=") for x in kv)
        try:
            result = run(name, opts, args.model, questions, args.new, Path(args.out))
        except Exception as err:
            traceback.print_exc()
            result = dict(variant=name, **opts, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)
        results.append(result)
    Path(args.out, "bench_predict.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
