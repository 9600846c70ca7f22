"""flashmla-cuda: CUDA C++ kernels compiled at run time through CuPy's NVRTC.

This module is what the ``flashmla.backends`` entry point loads: it only declares support and
must stay import-light (no CuPy import). The implementation lives in :mod:`flashmla_cuda.ops`;
kernel sources are the ``kernels/*.cu`` files beside it, compiled per device by
:mod:`flashmla_cuda.compiler`.

The kernels here are the *portable* family (warp-level ``mma.sync`` tensor-core code, compute
capability 8.0 and newer; SM100 runs it too). Architecture-specific families register as
separate op entries with ``arch=...`` and a higher priority when they exist.
"""

from __future__ import annotations

__version__ = "0.1.0"


def spec():
    import torch

    from flashmla.formats import CacheFormat
    from flashmla.registry import BackendSpec, OpSupport

    cc = (8, 0)
    halves = frozenset({torch.bfloat16, torch.float16})
    decode = OpSupport(
        min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat),
        features=frozenset({"causal", "mtp"}),
    )  # fmt: skip
    sparse = OpSupport(
        min_cc=cc, cache_formats=frozenset(CacheFormat),
        features=frozenset({"mtp", "attn_sink", "topk_length", "extra_cache", "extra_topk_length"}),
    )  # fmt: skip
    prefill = OpSupport(min_cc=cc, features=frozenset({"attn_sink", "topk_length"}))
    mha_dims = frozenset({(128, 128), (192, 128), (64, 64), (128, 64)})
    mha = OpSupport(
        min_cc=cc, dtypes=halves, head_dims=mha_dims, features=frozenset({"causal", "gqa"})
    )
    write = OpSupport(min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat))
    return BackendSpec(
        name="cuda",
        version=__version__,
        implementation="flashmla_cuda.ops",
        priority=10,
        requires=("cupy",),
        description="CUDA C++ via CuPy NVRTC: portable mma.sync kernels (SM80+) for every op",
        ops={
            "dense_decode": decode,
            "sparse_decode": sparse,
            "sparse_prefill": prefill,
            "mha_forward": mha,
            "mha_backward": mha,
            "cache_write": write,
        },
    )
