"""What `compute.offload_layers` does to GPU memory, pass by pass, on the real build (4-bit base, fused LoRA, the
dropout kernels, Liger): for each layout, three forward and backward passes over one packed row of random tokens,
each pass's peak and what is allocated at the end of forward, the bytes copied out, and how many of the tensors the
offloaded layers saved are still alive at the end of forward (they should be none: their copies stand in for them).

    python benchmarks/probe_offload.py --model $CKPT --layouts 24,0 16,8 16,8,unbounded
"""

import argparse
import json
import time
import weakref

import torch

from lit_mistral import config
from lit_mistral.modeling import offload as offload_module
from lit_mistral.modeling.build import decoder, set_checkpointing
from lit_mistral.module import QLoRAModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layouts", nargs="+", default=["24,0", "16,8", "16,8,unbounded"],
                        help="recompute,offload[,unbounded]")
    args = parser.parse_args()
    alive: list = []
    pack = offload_module.ActivationOffload._pack

    def counting_pack(self, i, t):
        handle = pack(self, i, t)
        if handle is not t:
            alive.append(weakref.ref(t))
        return handle

    offload_module.ActivationOffload._pack = counting_pack
    compute = config.Compute(dtype="bfloat16", kernels="liger", shared_dropout=True, dropout_kernel=True,
                             checkpoint_layers=0, offload_layers=0)
    module = QLoRAModule(name_or_path=args.model, compute=compute,
                         quantization=config.Quantization(fp32_norms=False)).build(torch.device("cuda"))
    body = decoder(module.model)
    ids = torch.randint(5, 30000, (1, args.tokens), device="cuda")
    for layout in args.layouts:
        parts = layout.split(",")
        layers, offload = int(parts[0]), int(parts[1])
        module.spec.compute.offload_layers = offload
        set_checkpointing(module.model, layers, offload)
        offloader = getattr(module.model, "_activation_offload", None)
        if offloader is not None:
            offloader.bounded = "unbounded" not in parts
        for step in range(3):
            alive.clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                hidden = body(input_ids=ids).last_hidden_state
            loss = hidden.float().pow(2).mean()
            torch.cuda.synchronize()
            after_forward = torch.cuda.memory_allocated() / 2**30
            forward_peak = torch.cuda.max_memory_allocated() / 2**30
            still = sum(r() is not None for r in alive)
            loss.backward()
            torch.cuda.synchronize()
            module.model.zero_grad(set_to_none=True)
            print(json.dumps(dict(layout=layout, step=step, seconds=round(time.perf_counter() - started, 3),
                                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                  forward_peak_gib=round(forward_peak, 2), after_forward_gib=round(after_forward, 2),
                                  out_gib=round(offloader.bytes_out / 2**30, 2) if offloader else 0,
                                  saved_offloaded=len(alive), still_alive=still)), flush=True)
            del hidden, loss


if __name__ == "__main__":
    main()
