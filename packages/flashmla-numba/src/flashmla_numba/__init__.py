"""flashmla-numba: the readable backend. MLA kernels written in Python with numba-cuda.

This module is what the ``flashmla.backends`` entry point loads: it only declares support and
must stay import-light (no numba import). The kernels live beside it:

* :mod:`.attention` - MLA attention (dense decode, sparse decode, sparse prefill): online
  softmax over tiles of keys, every key tile read once for a whole tile of query heads;
* :mod:`.combine` - merges the pieces of requests that were split across CTAs (split-KV);
* :mod:`.mha` - dense MHA prefill forward (the same tile loop, separate K and V);
* :mod:`.cache_write` - paged-cache write, FP8 quantization byte-exact with ``flashmla.formats``.

Math is fp32 on CUDA cores (numba has no tensor-core API), so this backend favours clarity
over speed. ``mha_backward`` is not implemented: the registry sends gradients to another
backend (``ref`` or ``triton``), and forcing this one for a backward pass raises
``NoBackendError`` saying so.

Under ``NUMBA_ENABLE_CUDASIM=1`` (Numba's CUDA simulator, which runs kernels thread by thread
on the CPU) the backend declares CPU tensors instead of CUDA ones, so the shared parity suite
runs it on a machine without a GPU, like the Triton backend under ``TRITON_INTERPRET``. There
it only runs when forced (its ops rank below the reference), and cases with more than
``SIM_MAX_ROWS`` query rows per key tile are declared unsupported (minutes each).
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# The simulator runs one OS thread per CUDA thread and every multiply-add in Python: past this
# many query rows per key (s_q * h_q / h_kv, or h_q for sparse ops) a case takes minutes there.
SIM_MAX_ROWS = 64


def _simulator_budget(facts) -> list[str]:
    rows = facts.s_q * facts.h_q // max(facts.h_kv, 1) if facts.op == "dense_decode" else facts.h_q
    if SIM and rows > SIM_MAX_ROWS:
        return [
            f"the CUDA simulator is too slow for {rows} query rows per key tile "
            f"(> {SIM_MAX_ROWS}); this case runs on a GPU"
        ]
    return []


def spec():
    import torch

    from flashmla.formats import CacheFormat
    from flashmla.registry import BackendSpec, OpSupport

    devices = frozenset({"cpu"} if SIM else {"cuda"})
    cc = (8, 0)
    # In the simulator the backend is a test vehicle: it runs when forced (as the parity suites
    # do) but never wins automatic dispatch, which would route every CPU call (test inputs'
    # cache fills included) through the slow simulator instead of the reference.
    sim_priority = {"priority": -1} if SIM else {}
    halves = frozenset({torch.bfloat16, torch.float16})
    decode = OpSupport(
        devices=devices, min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat),
        features=frozenset({"causal", "mtp"}), check=_simulator_budget, **sim_priority,
    )  # fmt: skip
    sparse = OpSupport(
        devices=devices, min_cc=cc, cache_formats=frozenset(CacheFormat),
        features=frozenset({"mtp", "attn_sink", "topk_length", "extra_cache", "extra_topk_length"}),
        check=_simulator_budget, **sim_priority,
    )  # fmt: skip
    prefill = OpSupport(
        devices=devices, min_cc=cc, features=frozenset({"attn_sink", "topk_length"}),
        check=_simulator_budget, **sim_priority,
    )  # fmt: skip
    mha = OpSupport(
        devices=devices,
        min_cc=cc,
        dtypes=halves,
        head_dims=frozenset({(128, 128), (192, 128), (64, 64), (128, 64)}),
        features=frozenset({"causal", "gqa"}),
        **sim_priority,
    )
    write = OpSupport(
        devices=devices, min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat),
        **sim_priority,
    )  # fmt: skip
    return BackendSpec(
        name="numba",
        version=__version__,
        implementation="flashmla_numba.ops",
        priority=5,
        requires=("numba",),
        description=(
            "numba-cuda kernels in plain Python, fp32 CUDA-core math (the readable backend): "
            "MLA decode/prefill with split-KV, MHA forward, cache write. No mha_backward "
            "(gradients go to another backend)"
        ),
        ops={
            "dense_decode": decode,
            "sparse_decode": sparse,
            "sparse_prefill": prefill,
            "mha_forward": mha,
            "cache_write": write,
        },
    )
