"""What pinning CPU memory costs, as `offload_layers` pins it: the activations of 8 offloaded decoder layers of
Mistral-7B at 16,384 tokens (per layer 4 tensors of the hidden size and 3 of the MLP's, 1.8 GiB), allocated pinned
(`torch.empty(..., pin_memory=True)`, torch's caching host allocator, as `offload.ActivationOffload` does) and
filled once from the GPU, in a fresh process per allocator setting:

  default                   cudaHostAlloc, one call per block
  register:N                pinned_use_cuda_host_register: the pages allocated by malloc, touched by N threads and
                            registered with cudaHostRegister (PYTORCH_CUDA_ALLOC_CONF)
  runtime-register:N        the same, set after start with torch.cuda.memory._set_allocator_settings

One JSON line per setting: seconds to allocate, GiB/s, seconds to copy into the blocks from the GPU, and seconds to
allocate the same again once freed (the allocator's cache).

    python benchmarks/train/bench_pinning.py [--layers 8] [--tokens 16384]
"""

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 2**30


def registering(setting: str) -> str:
    """The allocator setting that pins by registering pages with the threads `setting` (`...:N`) names."""
    return f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{setting.split(':')[1]}"


def child(setting: str, layers: int, tokens: int) -> dict:
    import torch

    if setting.startswith("runtime-register:"):
        torch.cuda.memory._set_allocator_settings(registering(setting))
    torch.cuda.init()
    torch.empty(1, device="cuda")
    shapes = [(tokens, 4096)] * 4 + [(tokens, 14336)] * 3
    total = layers * sum(a * b * 2 for a, b in shapes)
    started = time.perf_counter()
    blocks = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(layers) for shape in shapes]
    alloc = time.perf_counter() - started
    source = {shape: torch.ones(shape, dtype=torch.bfloat16, device="cuda") for shape in set(shapes)}
    torch.cuda.synchronize()
    started = time.perf_counter()
    for block in blocks:
        block.copy_(source[tuple(block.shape)], non_blocking=True)
    torch.cuda.synchronize()
    copy = time.perf_counter() - started
    assert all(bool(b[0, 0] == 1) for b in blocks)
    del blocks
    started = time.perf_counter()
    again = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(layers) for shape in shapes]
    cached = time.perf_counter() - started
    del again
    stats = {k: v for k, v in torch.cuda.host_memory_stats().items() if "time" in k or k.startswith("num_")} \
        if hasattr(torch.cuda, "host_memory_stats") else {}
    return dict(kind="pinning", setting=setting, gib=round(total / GIB, 2), alloc_s=round(alloc, 2),
                alloc_gib_per_s=round(total / GIB / alloc, 2), copy_s=round(copy, 2),
                copy_gib_per_s=round(total / GIB / copy, 1), cached_alloc_s=round(cached, 3), stats=stats,
                torch=torch.__version__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--settings", nargs="*", default=["default", "register:8", "register:16", "runtime-register:8"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.tokens)), flush=True)
        return
    for setting in args.settings:
        env = dict(os.environ)
        if setting.startswith("register:"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = registering(setting)
        done = subprocess.run([sys.executable, __file__, "--child", setting, "--layers", str(args.layers),
                               "--tokens", str(args.tokens)], env=env, capture_output=True, text=True, timeout=240)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps(dict(kind="pinning", setting=setting, rc=done.returncode,
                                                      tail=done.stderr.splitlines()[-5:])), flush=True)


if __name__ == "__main__":
    main()
