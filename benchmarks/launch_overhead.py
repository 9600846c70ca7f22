"""Host time of one decode call per backend (GPU): validation, dispatch and kernel launches.

Calls are issued back to back without synchronising; with a tiny problem the GPU keeps up, so
the time per call is the host's. Prints microseconds per call."""

from __future__ import annotations

import time

import torch

import flashmla
from flashmla import testing
from flashmla.bench.overhead import dispatch_overhead_us


def main() -> None:
    dev = torch.device("cuda")
    print(f"validation + dispatch only: {dispatch_overhead_us(dev):.1f} us")
    inputs = testing.dense_decode_inputs(2, 1, 16, 64, device=dev, seed=1)
    for backend in flashmla.available_backends():
        with flashmla.use_backend(backend):
            call = dict(inputs, tile_scheduler_metadata=flashmla.get_mla_metadata()[0])
            for _ in range(20):
                flashmla.flash_mla_with_kvcache(**call)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(500):
                flashmla.flash_mla_with_kvcache(**call)
            host = (time.perf_counter() - start) / 500 * 1e6
            torch.cuda.synchronize()
        print(f"{backend}: {host:.1f} us per decode call on the host (kernels included)")


if __name__ == "__main__":
    main()
