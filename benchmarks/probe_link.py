"""The GPU's link to CPU memory, as `compute.offload_layers` uses it: pinned copies out and back (GB/s), alone, both
ways at once, and beside bf16 matrix multiplies (their TFLOP/s with and without copies running).

    python benchmarks/probe_link.py [--gib 1] [--repeat 5]
"""

import argparse
import json
import time

import torch


def timed(fn, repeat: int) -> float:
    """Seconds per call of `fn`, the median of `repeat` after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = int(args.gib * 2**30)
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    gpu2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    cpu = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    cpu2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out_stream, back_stream = torch.cuda.Stream(), torch.cuda.Stream()

    def out():
        with torch.cuda.stream(out_stream):
            cpu.copy_(gpu, non_blocking=True)

    def back():
        with torch.cuda.stream(back_stream):
            gpu2.copy_(cpu2, non_blocking=True)

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def matmuls():
        for _ in range(20):
            a @ b

    flops = 20 * 2 * 8192**3
    result = {"gib": args.gib}
    result["out_gb_s"] = n / timed(out, args.repeat) / 1e9
    result["back_gb_s"] = n / timed(back, args.repeat) / 1e9
    result["both_gb_s_each"] = n / timed(lambda: (out(), back()), args.repeat) / 1e9
    alone = timed(matmuls, args.repeat)
    result["matmul_tflops"] = flops / alone / 1e12
    beside = timed(lambda: (out(), back(), matmuls()), args.repeat)
    result["matmul_tflops_beside_copies"] = flops / beside / 1e12
    result["matmul_s"], result["copies_s_alone"] = alone, 2 * n / (result["both_gb_s_each"] * 1e9) / 2
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))


if __name__ == "__main__":
    main()
