"""The Python-side cost of one decode call: validation and dispatch, no kernel.

A stand-in backend (registered for the measurement only) returns preallocated outputs, so the
time per call is what flashmla itself adds on the host: building the problem, choosing the
backend, the SchedMeta bookkeeping. The target is under 20 us (``spec/performance.md``)."""

from __future__ import annotations

import sys
import time
import types

import torch

from .. import api, testing
from ..registry import REGISTRY, BackendSpec, OpSupport, use_backend

_NAME = "overhead-probe"


def dispatch_overhead_us(device: torch.device, calls: int = 3000) -> float:
    inputs = testing.dense_decode_inputs(4, 1, 128, 256, device=device, seed=1)
    outputs = testing.problem_for("decode", inputs).empty_outputs()
    module = types.ModuleType(f"flashmla_{_NAME.replace('-', '_')}")
    module.dense_decode = lambda p, plan: outputs
    sys.modules[module.__name__] = module
    support = OpSupport(
        devices=frozenset({device.type}),
        dtypes=frozenset({torch.bfloat16}),
        features=frozenset({"causal", "mtp"}),
    )
    REGISTRY.register(
        BackendSpec(_NAME, "0", module.__name__, {"dense_decode": support}), replace=True
    )
    try:
        with use_backend(_NAME):
            meta = api.get_mla_metadata()[0]
            call = dict(inputs, tile_scheduler_metadata=meta)
            for _ in range(100):
                api.flash_mla_with_kvcache(**call)
            best = float("inf")
            for _ in range(5):  # best of 5 runs: the host's noise only ever adds time
                start = time.perf_counter()
                for _ in range(calls):
                    api.flash_mla_with_kvcache(**call)
                best = min(best, (time.perf_counter() - start) / calls * 1e6)
    finally:
        REGISTRY.unregister(_NAME)
        del sys.modules[module.__name__]
    return best
