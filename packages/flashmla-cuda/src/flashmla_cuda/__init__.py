"""flashmla-cuda: CUDA C++ kernels compiled at run time through CuPy's NVRTC.

This module is what the ``flashmla.backends`` entry point loads: it only declares support and
must stay import-light (no CuPy import). The implementation lives in :mod:`flashmla_cuda.ops`;
kernel sources are the ``kernels/*.cu`` files beside it, compiled per device by
:mod:`flashmla_cuda.compiler`.

Two backends come from this package:

- ``cuda``: the *portable* family (warp-level ``mma.sync`` tensor-core code, compute capability
  8.0 and newer; SM100 runs it too) for every op;
- ``cuda-sm90``: Hopper's own decode and sparse prefill kernels (wgmma, TMA, warp
  specialization; sm_90a), for the cases it declares (:func:`sm90_spec`). It outranks every
  other backend there (its sparse decode excepted, for now); whatever it does not declare falls through the registry
  (with its reasons) to the next backend.
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


def unverified_enabled(kind: str) -> bool:
    """Whether ``FLASHMLA_CUDA_SM90_UNVERIFIED`` asks for SM90 builds of ``kind`` that are not
    used by default yet: ``cluster`` (dense 2-CTA clusters: they pass the GPU suite, but no
    measurement shows them faster), ``fp8_pairs``, ``pipe``, ``pv_first``, ``prefetch_idx`` and
    ``reg_stage`` (sparse variants not measured faster yet: ``decode_sm90.build_for``). The
    variable lists kinds (``pipe,pv_first``) or is ``1`` for all."""
    import os

    wanted = os.environ.get("FLASHMLA_CUDA_SM90_UNVERIFIED", "").split(",")
    return "1" in wanted or kind in wanted


def sm90_spec():
    """The ``cuda-sm90`` backend: dense decode, sparse decode (FP8 V3.2 / MODEL1 and bf16) and
    sparse prefill, h_q 64 or 128
    (``packages/flashmla-cuda/NOTES-sm90.md``)."""
    import torch

    from flashmla.formats import CacheFormat
    from flashmla.registry import BackendSpec, OpSupport, PageSizes

    decode = OpSupport(
        arch="sm_90a", dtypes=frozenset({torch.bfloat16, torch.float16}),
        cache_formats=frozenset({CacheFormat.BF16, CacheFormat.FP16}),
        head_dims=frozenset({(576, 512)}), page_sizes=PageSizes(64, 1024, 64),
        features=frozenset({"causal", "mtp"}),
    )  # fmt: skip
    heads = frozenset({64, 128})
    formats = frozenset({CacheFormat.FP8_V32, CacheFormat.FP8_MODEL1, CacheFormat.BF16})
    extra = {"extra_cache", "extra_topk_length"}
    sparse = OpSupport(
        arch="sm_90a", cache_formats=formats, head_dims=frozenset({(576, 512), (512, 512)}),
        h_q=heads, features=frozenset({"mtp", "attn_sink", "topk_length", *extra}),
    )  # fmt: skip
    prefill = OpSupport(
        arch="sm_90a", head_dims=frozenset({(576, 512), (512, 512)}), h_q=heads,
        features=frozenset({"attn_sink", "topk_length"}),
    )  # fmt: skip
    ops = {"dense_decode": decode, "sparse_decode": sparse, "sparse_prefill": prefill}
    return BackendSpec(
        name="cuda-sm90",
        version=__version__,
        implementation="flashmla_cuda.decode_sm90",
        priority=30,
        requires=("cupy",),
        description="CUDA C++ via CuPy NVRTC: SM90 decode (wgmma, TMA, warp specialization)",
        ops=ops,
    )
