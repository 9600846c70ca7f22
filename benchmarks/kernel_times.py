"""GPU time of each kernel one call launches, per shape and backend (torch.profiler / CUPTI):
    python benchmarks/kernel_times.py D7,D9 cuda-sm90,cuda

Prints, per shape and backend, every kernel's mean duration per call and the sum, next to the
eager time of the whole call; the difference is launch gaps and host time."""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from flashmla.bench import runner

CALLS = 20


def main() -> None:
    for shape_id, backend, call in runner.each_call(sys.argv[1], sys.argv[2], torch.device("cuda")):
        eager = do_bench(call, warmup=30, rep=100, return_mode="median") * 1e3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                call()
            torch.cuda.synchronize()
        per_kernel: dict[str, float] = defaultdict(float)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name[:60]] += event.device_time / CALLS
        total = sum(per_kernel.values())
        print(f"{shape_id} {backend}: eager {eager:.1f} us, kernels {total:.1f} us")
        for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            print(f"    {us:8.1f} us  {name}")


if __name__ == "__main__":
    main()
