"""Where a training pass with the recomputing layers' inputs in CPU memory (`offload_inputs`) takes its GPU memory,
against the same pass with the inputs on the GPU, on the tiny Mistral of `tests/modeling/test_offload.py` (8 layers,
hidden size 512, 4 x 1,024 tokens, float32: each layer's input is 8 MiB):

    python benchmarks/train/probe_inputs.py          # on a CUDA GPU, from the repository root

prints one JSON line per pass: whether the inputs go to the CPU, how far ahead of its backward an offloaded input is
fetched (`offload.AHEAD`; null: as shipped), the MiB allocated at the end of forward, the forward's and the
backward's peaks, and the MiB allocated as each layer's backward begins, all above what was allocated before the
pass. Each setting runs twice, alternating, so that first-call allocations (cuBLAS's workspace) show as such."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lit_mistral.modeling import offload  # noqa: E402
from lit_mistral.modeling.build import checkpointable_layers, set_checkpointing  # noqa: E402
from tests.modeling.test_offload import tiny_mistral  # noqa: E402

MIB = 2**20


def one_pass(model, ids, inputs: bool, ahead: int | None = None) -> dict:
    shipped = offload.AHEAD
    if ahead is not None:
        offload.AHEAD = ahead
    set_checkpointing(model, None, 0, inputs)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    marks = []

    def mark(i):
        return lambda module, grad: marks.append((i, round((torch.cuda.memory_allocated() - before) / MIB, 1)))
    hooks = [b.register_full_backward_pre_hook(mark(i)) for i, b in enumerate(checkpointable_layers(model))]
    try:
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        forward_end = torch.cuda.memory_allocated() - before
        forward_peak = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        backward_peak = torch.cuda.max_memory_allocated() - before
    finally:
        for hook in hooks:
            hook.remove()
        offload.AHEAD = shipped
    return {"inputs": inputs, "ahead": ahead, "forward_end_mib": round(forward_end / MIB, 1),
            "forward_peak_mib": round(forward_peak / MIB, 1), "backward_peak_mib": round(backward_peak / MIB, 1),
            "backward_begins_mib": marks}


def main() -> None:
    model = tiny_mistral(layers=8, hidden=512, device="cuda")
    ids = torch.randint(0, 100, (4, 1024), device="cuda")
    print(json.dumps({"attention": model.config._attn_implementation, "input_mib": 4 * 1024 * 512 * 4 / MIB}))
    for inputs, ahead in [(False, None), (True, None), (False, None), (True, None), (True, 99), (True, 0)]:
        print(json.dumps(one_pass(model, ids, inputs, ahead)), flush=True)


if __name__ == "__main__":
    main()
