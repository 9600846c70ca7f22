"""flashmla-triton: Triton kernels for every flashmla op (compute capability 8.0 and newer).

This module is what the ``flashmla.backends`` entry point loads: it only declares support and
must stay import-light (no triton import). Under ``TRITON_INTERPRET=1`` the backend declares
CPU tensors instead (Triton's interpreter runs the same kernels on the host; CI uses that).
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def spec():
    import torch

    from flashmla.formats import CacheFormat
    from flashmla.registry import BackendSpec, OpSupport

    devices = frozenset({"cpu"} if INTERPRET else {"cuda"})
    cc = (8, 0)
    halves = frozenset({torch.bfloat16, torch.float16})
    decode = OpSupport(
        devices=devices, min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat),
        features=frozenset({"causal", "mtp"}),
    )  # fmt: skip
    sparse = OpSupport(
        devices=devices, min_cc=cc, cache_formats=frozenset(CacheFormat),
        features=frozenset({"mtp", "attn_sink", "topk_length", "extra_cache", "extra_topk_length"}),
    )  # fmt: skip
    prefill = OpSupport(
        devices=devices, min_cc=cc, features=frozenset({"attn_sink", "topk_length"})
    )
    mha_dims = frozenset({(128, 128), (192, 128), (64, 64), (128, 64)})
    mha = OpSupport(
        devices=devices,
        min_cc=cc,
        dtypes=halves,
        head_dims=mha_dims,
        features=frozenset({"causal", "gqa"}),
    )
    write = OpSupport(
        devices=devices, min_cc=cc, dtypes=halves, cache_formats=frozenset(CacheFormat)
    )
    return BackendSpec(
        name="triton",
        version=__version__,
        implementation="flashmla_triton.ops",
        priority=20,
        requires=("triton",),
        description="Triton kernels: MLA decode/prefill (split-KV, FP8 dequant in-kernel), MHA fwd/bwd",
        ops={
            "dense_decode": decode,
            "sparse_decode": sparse,
            "sparse_prefill": prefill,
            "mha_forward": mha,  # backward too: GQA included, deterministic
            "mha_backward": mha,
            "cache_write": write,
        },
    )
