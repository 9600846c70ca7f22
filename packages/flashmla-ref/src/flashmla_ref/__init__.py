"""flashmla-ref: the PyTorch reference backend (CPU and CUDA, fp32 math).

It is the oracle every other backend is tested against and the fallback where nothing faster
applies. This module only declares what the backend supports (it is what the
``flashmla.backends`` entry point loads); the math lives in :mod:`flashmla_ref.ops`.
"""

from __future__ import annotations

__version__ = "0.1.0"


def spec():
    import torch

    from flashmla.formats import CacheFormat
    from flashmla.registry import BackendSpec, OpSupport

    anywhere = frozenset({"cpu", "cuda"})
    halves = frozenset({torch.bfloat16, torch.float16})
    decode = OpSupport(
        devices=anywhere,
        dtypes=halves,
        cache_formats=frozenset(CacheFormat),
        features=frozenset({"causal", "mtp"}),
    )
    sparse = OpSupport(
        devices=anywhere,
        cache_formats=frozenset(CacheFormat),
        features=frozenset({"mtp", "attn_sink", "topk_length", "extra_cache", "extra_topk_length"}),
    )
    prefill = OpSupport(devices=anywhere, features=frozenset({"attn_sink", "topk_length"}))
    mha = OpSupport(
        devices=anywhere, dtypes=halves, features=frozenset({"causal", "gqa"}), capturable=False
    )
    write = OpSupport(
        devices=anywhere, dtypes=halves, cache_formats=frozenset(CacheFormat), capturable=False
    )
    return BackendSpec(
        name="ref",
        version=__version__,
        implementation="flashmla_ref.ops",
        priority=0,
        description="PyTorch reference: exact contract semantics in fp32, chunked to bound memory",
        ops={
            "dense_decode": decode,
            "sparse_decode": sparse,
            "sparse_prefill": prefill,
            "mha_forward": mha,
            "mha_backward": mha,
            "cache_write": write,
        },
    )
