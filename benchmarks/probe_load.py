"""Where loading a 4-bit base goes: `from_pretrained` of a 16-bit folder quantized while loading (what `fit` does),
against the same model saved already quantized (transformers' bitsandbytes serialization) and loaded from there;
each twice (the second with the files in the page cache). Prints one JSON line per measurement.

    python benchmarks/probe_load.py --model /tmp/mistral7b-random --out /tmp/mistral7b-nf4
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def timed_load(folder: str, **kwargs) -> tuple[torch.nn.Module, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": 0}, **kwargs)
    torch.cuda.synchronize()
    return model, time.perf_counter() - started


def read_files(folder: str) -> tuple[float, int]:
    started, size = time.perf_counter(), 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 26):
                size += len(chunk)
    return time.perf_counter() - started, size


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.zeros(1, device="cuda")  # the CUDA context first: not part of either load
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    for run in (1, 2):
        seconds, size = read_files(args.model)
        print(json.dumps({"probe": "read the 16-bit files", "run": run, "s": round(seconds, 2), "GB": round(size / 1e9, 2)}))
        model, seconds = timed_load(args.model, quantization_config=config)
        print(json.dumps({"probe": "16-bit folder, quantized while loading", "run": run, "s": round(seconds, 2)}))
        if run == 2:
            started = time.perf_counter()
            model.save_pretrained(args.out)
            print(json.dumps({"probe": "save quantized", "s": round(time.perf_counter() - started, 2)}))
        del model
        torch.cuda.empty_cache()
    for run in (1, 2):
        seconds, size = read_files(args.out)
        print(json.dumps({"probe": "read the 4-bit files", "run": run, "s": round(seconds, 2), "GB": round(size / 1e9, 2)}))
        model, seconds = timed_load(args.out)
        print(json.dumps({"probe": "4-bit folder", "run": run, "s": round(seconds, 2),
                          "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in model.modules())}))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
