"""flashmla: Multi-head Latent Attention kernels with FlashMLA's API, on several backends.

Public API (FlashMLA-compatible): :func:`get_mla_metadata`, :func:`flash_mla_with_kvcache`,
:func:`flash_mla_sparse_fwd`, :func:`flash_attn_varlen_func` and its packed variants.
Backend choice: :func:`set_backend`, :func:`use_backend`, env ``FLASHMLA_BACKEND``,
:func:`available_backends`; ``python -m flashmla info`` shows who supports what.
"""

from __future__ import annotations

from . import formats, paged, scheduler
from .api import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_mla_sparse_fwd,
    flash_mla_with_kvcache,
    get_mla_metadata,
)
from .errors import (
    DeviceError,
    DTypeError,
    FlashMLAError,
    InvalidArgumentError,
    LayoutError,
    NoBackendError,
    SchedMetaMismatchError,
    ShapeError,
    UnknownBackendError,
)
from .formats import CacheFormat
from .paged import allocate_paged_cache, make_block_table, slots_for_positions, write_kv_cache
from .registry import (
    BackendSpec,
    OpSupport,
    PageSizes,
    available_backends,
    register_backend,
    set_backend,
    use_backend,
)
from .scheduler import SchedMeta

__version__ = "0.1.0"

FlashMLASchedMeta = SchedMeta  # FlashMLA's name for it

__all__ = [
    "BackendSpec",
    "CacheFormat",
    "DTypeError",
    "DeviceError",
    "FlashMLAError",
    "FlashMLASchedMeta",
    "InvalidArgumentError",
    "LayoutError",
    "NoBackendError",
    "OpSupport",
    "PageSizes",
    "SchedMeta",
    "SchedMetaMismatchError",
    "ShapeError",
    "UnknownBackendError",
    "allocate_paged_cache",
    "available_backends",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "formats",
    "get_mla_metadata",
    "make_block_table",
    "paged",
    "register_backend",
    "scheduler",
    "set_backend",
    "slots_for_positions",
    "use_backend",
    "write_kv_cache",
]
