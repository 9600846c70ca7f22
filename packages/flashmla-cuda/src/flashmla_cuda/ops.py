"""The CUDA backend's op functions (what :mod:`flashmla.registry` calls)."""

from __future__ import annotations

from .attention import (
    dense_decode,
    plan_dense_decode,
    plan_sparse_decode,
    sparse_decode,
    sparse_prefill,
)
from .cache_write import cache_write
from .mha import mha_backward, mha_forward

__all__ = [
    "cache_write",
    "dense_decode",
    "mha_backward",
    "mha_forward",
    "plan_dense_decode",
    "plan_sparse_decode",
    "sparse_decode",
    "sparse_prefill",
]
