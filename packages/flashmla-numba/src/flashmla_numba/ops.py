"""The numba backend's op functions (what :mod:`flashmla.registry` calls).

``mha_backward`` is deliberately absent (the spec does not list it): see the package docstring.
"""

from __future__ import annotations

from .attention import dense_decode, sparse_decode, sparse_prefill
from .cache_write import cache_write
from .mha import mha_forward

__all__ = ["cache_write", "dense_decode", "mha_forward", "sparse_decode", "sparse_prefill"]
