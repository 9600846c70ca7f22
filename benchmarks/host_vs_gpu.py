"""Host cost against GPU time of one decode call per backend (GPU):
    python benchmarks/host_vs_gpu.py D4,D10 cuda,triton

Prints, per shape and backend: the eager time (do_bench), the host time per call (calls issued
back to back, no synchronisation), and the time of the same call replayed from a CUDA graph
(GPU only). Eager close to host means the measurement is host-bound."""

from __future__ import annotations

import sys
import time

import torch
from triton.testing import do_bench

from flashmla.bench import runner


def main() -> None:
    for shape_id, backend, call in runner.each_call(sys.argv[1], sys.argv[2], torch.device("cuda")):
        eager = do_bench(call, warmup=30, rep=200, return_mode="median") * 1e3
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            call()
        host = (time.perf_counter() - start) / 200 * 1e6
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        replay = do_bench(graph.replay, warmup=30, rep=200, return_mode="median") * 1e3
        print(
            f"{shape_id} {backend:7s} eager {eager:8.1f} us  host {host:7.1f} us  "
            f"graph {replay:8.1f} us"
        )


if __name__ == "__main__":
    main()
