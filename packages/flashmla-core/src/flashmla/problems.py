"""Arguments become facts here, once per call.

Each public op builds one *problem*: the validated tensors plus a hashable :class:`Facts`
summary (device, dtype, head dims, page size, cache format, features used). Backends never
re-validate; the registry reads the facts to decide who can run the call. Every broken rule
raises a typed :mod:`flashmla.errors` exception naming the argument and the rule.

Rules on *values* inside tensors (lengths, page ids, indices) cannot be checked without a host
synchronisation, so they are defined instead of checked, and every backend honours them:

* ``cache_seqlens[i]`` is clamped to ``[0, block_table.shape[1] * page_size]``;
* a block-table entry outside ``[0, num_blocks)`` makes its page's tokens invisible;
* a sparse index outside ``[0, num_blocks * page_size)`` (decode) or ``[0, s_kv)`` (prefill) is
  an invalid entry, exactly like ``-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import DeviceError, DTypeError, InvalidArgumentError, LayoutError, ShapeError
from .formats import CacheFormat, detect_cache_format
from .scheduler import SchedMeta, Schedule

MAX_PAGE_SIZE = 1024
DECODE_DV = 512
HALF_DTYPES = (torch.bfloat16, torch.float16)


class Facts(NamedTuple):
    """What the registry needs to know about a call; hashable, so dispatch can be cached."""

    op: str
    device: torch.device
    dtype: torch.dtype
    cache_format: CacheFormat | None
    head_dims: tuple[int, int]
    h_q: int
    h_kv: int
    s_q: int
    page_size: int | None
    topk: int | None
    features: frozenset[str]


# --------------------------------------------------------------------------------------------
# Small checks. Each raises with the argument's name; they are the whole validation vocabulary.


def need_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(name, "must be a torch.Tensor", type(t).__name__)
    return t


def need_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise DTypeError(name, f"dtype must be {names}", t.dtype)


def need_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ShapeError(name, f"must have {ndim} dims {layout}", tuple(t.shape))


def need_size(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    if t.shape[dim] != size:
        raise ShapeError(name, f"shape[{dim}] must equal {what} = {size}", tuple(t.shape))


def need_positive(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    if t.shape[dim] < 1:
        raise ShapeError(name, f"{what} (shape[{dim}]) must be at least 1", tuple(t.shape))


def need_device(name: str, t: torch.Tensor, device: torch.device, ref: str = "q") -> None:
    if t.device != device:
        raise DeviceError(name, f"must be on the same device as {ref} ({device})", t.device)


def need_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise LayoutError(name, "the last dimension must be contiguous (stride 1)", t.stride())


def need_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise LayoutError(name, "must be contiguous", t.stride())


def need_none(name: str, value: object, why: str) -> None:
    if value is not None:
        raise InvalidArgumentError(name, why)


def need_scale(name: str, value: object, default: float | None) -> float:
    if value is None:
        if default is None:
            raise InvalidArgumentError(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(name, "must be a finite float", value)
    return float(value)


def need_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(name, "must be a bool", value)
    return value


def need_no_dropout(dropout_p: object) -> None:
    if dropout_p != 0.0:
        raise InvalidArgumentError("dropout_p", "must be 0.0 (dropout is not supported)", dropout_p)


def need_int_vector(
    name: str, t: object, size: int, device: torch.device, what: str
) -> torch.Tensor:
    """An int32 ``[size]`` contiguous tensor on ``device``."""
    t = need_tensor(name, t)
    need_device(name, t, device)
    need_dtype(name, t, (torch.int32,))
    need_ndim(name, t, 1, f"[{what}]")
    need_size(name, t, 0, size, what)
    need_contiguous(name, t)
    return t


def need_page_size(name: str, cache: torch.Tensor) -> int:
    page = cache.shape[1]
    if not 1 <= page <= MAX_PAGE_SIZE:
        raise ShapeError(name, f"page block size (shape[1]) must be in 1..{MAX_PAGE_SIZE}", page)
    return page


# --------------------------------------------------------------------------------------------
# Decode (dense and sparse share the metadata handling)

# Dense decode's feature sets by (s_q > 1, causal), built once: calls are latency-critical.
_DENSE_FEATURES = {
    (mtp, causal): frozenset(name for name, on in (("mtp", mtp), ("causal", causal)) if on)
    for mtp in (False, True)
    for causal in (False, True)
}


@dataclass(eq=False, slots=True)
class DenseDecodeProblem:
    facts: Facts
    q: torch.Tensor  # [b, s_q, h_q, d]
    k_cache: torch.Tensor  # [num_blocks, B, h_kv, d] (or FP8 bytes)
    block_table: torch.Tensor  # [b, max_blocks] int32
    cache_seqlens: torch.Tensor  # [b] int32
    softmax_scale: float
    causal: bool  # effective: requested and s_q > 1
    cache_format: CacheFormat
    schedule: Schedule | None  # old-style metadata passed by the caller

    def empty_outputs(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``out [b, s_q, h_q, 512]`` in q's dtype and ``lse [b, h_q, s_q]`` float32."""
        b, s_q, h_q, _ = self.q.shape
        out = self.q.new_empty((b, s_q, h_q, DECODE_DV), dtype=dtype)
        return out, self.q.new_empty((b, h_q, s_q), dtype=torch.float32)


@dataclass(eq=False, slots=True)
class SparseDecodeProblem:
    facts: Facts
    q: torch.Tensor  # [b, s_q, h_q, d_qk] bf16
    k_cache: torch.Tensor  # [num_blocks, B, 1, bytes or d_qk]
    indices: torch.Tensor  # [b, s_q, topk] int32 flat slots
    softmax_scale: float
    cache_format: CacheFormat
    topk_length: torch.Tensor | None  # [b]
    attn_sink: torch.Tensor | None  # [h_q] float32
    extra_k_cache: torch.Tensor | None
    extra_indices: torch.Tensor | None  # [b, s_q, extra_topk]
    extra_topk_length: torch.Tensor | None  # [b]
    schedule: Schedule | None

    def empty_outputs(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``out [b, s_q, h_q, 512]`` bf16 and ``lse`` as FlashMLA returns it: a ``[b, h_q, s_q]``
        transposed view of a contiguous ``[b, s_q, h_q]`` float32 buffer."""
        b, s_q, h_q, _ = self.q.shape
        out = self.q.new_empty((b, s_q, h_q, DECODE_DV), dtype=dtype)
        return out, self.q.new_empty((b, s_q, h_q), dtype=torch.float32).transpose(1, 2)


def _check_metadata(
    tile_scheduler_metadata: object, num_splits: object, b: int, device: torch.device
) -> Schedule | None:
    if tile_scheduler_metadata is None or isinstance(tile_scheduler_metadata, SchedMeta):
        need_none(
            "num_splits", num_splits, "must be None unless tile_scheduler_metadata is a tensor"
        )
        return None
    md = need_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    need_device("tile_scheduler_metadata", md, device)
    need_dtype("tile_scheduler_metadata", md, (torch.int32,))
    need_ndim("tile_scheduler_metadata", md, 2, "[num_sm_parts, 8]")
    need_size("tile_scheduler_metadata", md, 1, 8, "the metadata row width")
    need_contiguous("tile_scheduler_metadata", md)
    if num_splits is None:
        raise InvalidArgumentError("num_splits", "is required with tensor tile_scheduler_metadata")
    ns = need_int_vector("num_splits", num_splits, b + 1, device, "b + 1")
    return Schedule(md, ns)


def _check_q(q: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    q = need_tensor("q", q)
    need_ndim("q", q, 4, "[b, s_q, h_q, d]")
    need_dtype("q", q, dtypes)
    for dim, what in ((0, "b"), (1, "s_q"), (2, "h_q")):
        need_positive("q", q, dim, what)
    need_last_dim_contiguous("q", q)
    return q


def _check_cache(
    name: str, cache: object, q: torch.Tensor, is_fp8: bool, same_as: CacheFormat | None = None
) -> CacheFormat:
    cache = need_tensor(name, cache)
    need_device(name, cache, q.device)
    need_ndim(name, cache, 4, "[num_blocks, page_block_size, h_kv, d]")
    need_positive(name, cache, 0, "num_blocks")
    need_page_size(name, cache)
    need_positive(name, cache, 2, "h_kv")
    fmt = detect_cache_format(name, cache, is_fp8)
    if same_as is not None and fmt is not same_as:
        raise InvalidArgumentError(name, f"must use k_cache's format ({same_as})", fmt)
    d = q.shape[-1]
    if fmt.is_fp8:
        need_dtype("q", q, (torch.bfloat16,))
        if d != fmt.head_dim:
            raise ShapeError("q", f"head dim must be {fmt.head_dim} for an {fmt} cache", d)
    else:
        if cache.dtype != q.dtype:
            raise DTypeError(name, f"dtype must equal q's ({q.dtype})", cache.dtype)
        need_size(name, cache, 3, d, "q's head dim")
        need_last_dim_contiguous(name, cache)
    return fmt


def _check_head_dim_v(head_dim_v: object) -> None:
    if head_dim_v != DECODE_DV:
        raise InvalidArgumentError(
            "head_dim_v", f"must be {DECODE_DV} (V = the first 512 dims)", head_dim_v
        )


def build_dense_decode(
    q: object,
    k_cache: object,
    block_table: object,
    cache_seqlens: object,
    head_dim_v: object,
    tile_scheduler_metadata: object,
    num_splits: object,
    softmax_scale: object,
    causal: object,
    is_fp8_kvcache: bool,
) -> DenseDecodeProblem:
    q = _check_q(q, HALF_DTYPES)
    b, s_q, h_q, d = q.shape
    fmt = _check_cache("k_cache", k_cache, q, is_fp8_kvcache)
    if not fmt.is_fp8 and d != 576:
        raise ShapeError("q", "dense decode needs d_qk = 576 (512 latent + 64 RoPE)", d)
    _check_head_dim_v(head_dim_v)
    h_kv = k_cache.shape[2]
    if h_q % h_kv != 0:
        raise ShapeError("q", f"h_q must be a multiple of k_cache's h_kv = {h_kv}", h_q)
    block_table = need_tensor("block_table", block_table)
    need_device("block_table", block_table, q.device)
    need_dtype("block_table", block_table, (torch.int32,))
    need_ndim("block_table", block_table, 2, "[b, max_blocks_per_seq]")
    need_size("block_table", block_table, 0, b, "b")
    need_last_dim_contiguous("block_table", block_table)
    cache_seqlens = need_int_vector("cache_seqlens", cache_seqlens, b, q.device, "b")
    mtp = bool(s_q > 1)  # bool(): a symbolic s_q under torch.compile becomes a guard
    causal = need_bool("causal", causal) and mtp
    schedule = _check_metadata(tile_scheduler_metadata, num_splits, b, q.device)
    facts = Facts(
        "dense_decode", q.device, q.dtype, fmt, (d, DECODE_DV), h_q, h_kv, s_q,
        k_cache.shape[1], None, _DENSE_FEATURES[mtp, causal],
    )  # fmt: skip
    return DenseDecodeProblem(
        facts, q, k_cache, block_table, cache_seqlens,
        need_scale("softmax_scale", softmax_scale, d**-0.5), causal, fmt, schedule,
    )  # fmt: skip


def _check_sink(attn_sink: object, h_q: int, device: torch.device) -> torch.Tensor:
    """Per-head attention sink: float32 ``[h_q]`` contiguous, natural-log units."""
    sink = need_tensor("attn_sink", attn_sink)
    need_device("attn_sink", sink, device)
    need_dtype("attn_sink", sink, (torch.float32,))
    need_ndim("attn_sink", sink, 1, "[h_q]")
    need_size("attn_sink", sink, 0, h_q, "h_q")
    need_contiguous("attn_sink", sink)
    return sink


def _check_indices(name: str, t: object, b: int, s_q: int, device: torch.device) -> torch.Tensor:
    t = need_tensor(name, t)
    need_device(name, t, device)
    need_dtype(name, t, (torch.int32,))
    need_ndim(name, t, 3, "[b, s_q, topk]")
    need_size(name, t, 0, b, "b")
    need_size(name, t, 1, s_q, "s_q")
    need_positive(name, t, 2, "topk")
    need_last_dim_contiguous(name, t)
    return t


def build_sparse_decode(
    q: object,
    k_cache: object,
    indices: object,
    head_dim_v: object,
    tile_scheduler_metadata: object,
    num_splits: object,
    softmax_scale: object,
    causal: object,
    is_fp8_kvcache: bool,
    attn_sink: object,
    extra_k_cache: object,
    extra_indices_in_kvcache: object,
    topk_length: object,
    extra_topk_length: object,
) -> SparseDecodeProblem:
    if need_bool("causal", causal):
        raise InvalidArgumentError("causal", "must be False for sparse decode (indices given)")
    q = _check_q(q, (torch.bfloat16,))
    b, s_q, h_q, d = q.shape
    if d not in (576, 512):
        raise ShapeError("q", "sparse decode needs d_qk = 576 (V3.2) or 512 (MODEL1)", d)
    fmt = _check_cache("k_cache", k_cache, q, is_fp8_kvcache)
    if k_cache.shape[2] != 1:
        raise ShapeError(
            "k_cache", "sparse decode is MQA: h_kv (shape[2]) must be 1", k_cache.shape[2]
        )
    _check_head_dim_v(head_dim_v)
    indices = _check_indices("indices", indices, b, s_q, q.device)
    features = {"mtp"} if s_q > 1 else set()
    if topk_length is not None:
        topk_length = need_int_vector("topk_length", topk_length, b, q.device, "b")
        features.add("topk_length")
    if attn_sink is not None:
        attn_sink = _check_sink(attn_sink, h_q, q.device)
        features.add("attn_sink")
    if extra_k_cache is not None:
        _check_cache("extra_k_cache", extra_k_cache, q, is_fp8_kvcache, same_as=fmt)
        if extra_k_cache.shape[2] != 1:
            raise ShapeError("extra_k_cache", "h_kv (shape[2]) must be 1", extra_k_cache.shape[2])
        if extra_indices_in_kvcache is None:
            raise InvalidArgumentError("extra_indices_in_kvcache", "is required with extra_k_cache")
        extra_indices_in_kvcache = _check_indices(
            "extra_indices_in_kvcache", extra_indices_in_kvcache, b, s_q, q.device
        )
        features.add("extra_cache")
        if extra_topk_length is not None:
            extra_topk_length = need_int_vector(
                "extra_topk_length", extra_topk_length, b, q.device, "b"
            )
            features.add("extra_topk_length")
    else:
        need_none("extra_indices_in_kvcache", extra_indices_in_kvcache, "needs extra_k_cache")
        need_none("extra_topk_length", extra_topk_length, "needs extra_k_cache")
    schedule = _check_metadata(tile_scheduler_metadata, num_splits, b, q.device)
    facts = Facts(
        "sparse_decode", q.device, q.dtype, fmt, (d, DECODE_DV), h_q, 1, s_q,
        k_cache.shape[1], indices.shape[2], frozenset(features),
    )  # fmt: skip
    return SparseDecodeProblem(
        facts, q, k_cache, indices, need_scale("softmax_scale", softmax_scale, d**-0.5), fmt,
        topk_length, attn_sink, extra_k_cache, extra_indices_in_kvcache, extra_topk_length,
        schedule,
    )  # fmt: skip


def decode_config(p: DenseDecodeProblem | SparseDecodeProblem, causal: bool, is_fp8: bool) -> tuple:
    """The fields of the :class:`DecodeConfig` FlashMLA records in a SchedMeta on first use
    (with the *requested* causal flag), as a plain tuple: cheap to build and compare per call."""
    b, s_q, h_q, _ = p.q.shape
    if isinstance(p, SparseDecodeProblem) and p.extra_k_cache is not None:
        extra = (p.extra_k_cache.shape[1], p.extra_indices.shape[2])
    else:
        extra = (None, None)
    return (
        b,
        s_q,
        h_q,
        p.k_cache.shape[1],
        p.k_cache.shape[2],
        causal,
        is_fp8,
        p.facts.topk,
        *extra,
    )


# --------------------------------------------------------------------------------------------
# Sparse prefill


def row_groups(p: DenseDecodeProblem | SparseDecodeProblem) -> tuple[int, int, int]:
    """How a decode's query rows group around shared keys: (rows per group, groups per request,
    heads per KV head). Dense: the ``s_q * h_q / h_kv`` rows of one KV head form a group (one per
    KV head); sparse: the ``h_q`` heads of one query token (one group per token)."""
    _b, s_q, h_q, _ = p.q.shape
    if isinstance(p, SparseDecodeProblem):
        return h_q, s_q, h_q
    h_kv = p.k_cache.shape[2]
    return s_q * (h_q // h_kv), h_kv, h_q // h_kv


@dataclass(eq=False, slots=True)
class SparsePrefillProblem:
    facts: Facts
    q: torch.Tensor  # [s_q, h_q, d_qk] bf16
    kv: torch.Tensor  # [s_kv, 1, d_qk] bf16
    indices: torch.Tensor  # [s_q, 1, topk] int32
    sm_scale: float
    d_v: int
    attn_sink: torch.Tensor | None  # [h_q] float32
    topk_length: torch.Tensor | None  # [s_q] int32

    def empty_outputs(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``out [s_q, h_q, 512]`` bf16, ``max_logits`` and ``lse`` ``[s_q, h_q]`` float32."""
        s_q, h_q, _ = self.q.shape
        out = self.q.new_empty((s_q, h_q, self.d_v), dtype=dtype)
        max_logits = self.q.new_empty((s_q, h_q), dtype=torch.float32)
        return out, max_logits, torch.empty_like(max_logits)


def build_sparse_prefill(
    q: object, kv: object, indices: object, sm_scale: object, d_v: object,
    attn_sink: object, topk_length: object,
) -> SparsePrefillProblem:  # fmt: skip
    q = need_tensor("q", q)
    need_ndim("q", q, 3, "[s_q, h_q, d_qk]")
    need_dtype("q", q, (torch.bfloat16,))
    need_positive("q", q, 0, "s_q")
    need_positive("q", q, 1, "h_q")
    need_last_dim_contiguous("q", q)
    s_q, h_q, d = q.shape
    if d not in (576, 512):
        raise ShapeError("q", "sparse prefill needs d_qk = 576 or 512", d)
    if d_v != DECODE_DV:
        raise InvalidArgumentError("d_v", f"must be {DECODE_DV}", d_v)
    kv = need_tensor("kv", kv)
    need_device("kv", kv, q.device)
    need_ndim("kv", kv, 3, "[s_kv, h_kv, d_qk]")
    need_dtype("kv", kv, (torch.bfloat16,))
    need_positive("kv", kv, 0, "s_kv")
    need_size("kv", kv, 1, 1, "h_kv (sparse prefill is MQA)")
    need_size("kv", kv, 2, d, "q's head dim")
    need_last_dim_contiguous("kv", kv)
    indices = need_tensor("indices", indices)
    need_device("indices", indices, q.device)
    need_dtype("indices", indices, (torch.int32,))
    need_ndim("indices", indices, 3, "[s_q, h_kv, topk]")
    need_size("indices", indices, 0, s_q, "s_q")
    need_size("indices", indices, 1, 1, "h_kv")
    need_positive("indices", indices, 2, "topk")
    need_last_dim_contiguous("indices", indices)
    features = set()
    if attn_sink is not None:
        attn_sink = _check_sink(attn_sink, h_q, q.device)
        features.add("attn_sink")
    if topk_length is not None:
        topk_length = need_int_vector("topk_length", topk_length, s_q, q.device, "s_q")
        features.add("topk_length")
    facts = Facts(
        "sparse_prefill", q.device, q.dtype, None, (d, DECODE_DV), h_q, 1, s_q, None,
        indices.shape[2], frozenset(features),
    )  # fmt: skip
    return SparsePrefillProblem(
        facts, q, kv, indices, need_scale("sm_scale", sm_scale, None), DECODE_DV, attn_sink,
        topk_length,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dense MHA prefill (varlen)


@dataclass(eq=False, slots=True)
class MhaProblem:
    facts: Facts
    q: torch.Tensor  # [total_q, h_q, d_qk]
    k: torch.Tensor  # [total_k, h_kv, d_qk]
    v: torch.Tensor  # [total_k, h_kv, d_v]
    cu_seqlens_q: torch.Tensor  # [b + 1] int32
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool

    def empty_outputs(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``out [total_q, h_q, d_v]`` and ``lse [total_q, h_q]`` float32 with stride
        ``(1, total_q)`` (FlashMLA's layout: a transposed ``[h_q, total_q]`` buffer)."""
        total_q, h_q, _ = self.q.shape
        out = self.q.new_empty((total_q, h_q, self.v.shape[2]), dtype=dtype)
        return out, self.q.new_empty((h_q, total_q), dtype=torch.float32).t()

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


def build_mha(
    q: object, k: object, v: object, cu_seqlens_q: object, cu_seqlens_k: object,
    max_seqlen_q: object, max_seqlen_k: object, dropout_p: object, softmax_scale: object,
    causal: object, backward: bool = False,
) -> MhaProblem:  # fmt: skip
    q = need_tensor("q", q)
    need_ndim("q", q, 3, "[total_q, h_q, d_qk]")
    need_dtype("q", q, HALF_DTYPES)
    need_last_dim_contiguous("q", q)
    for name, t in (("k", k), ("v", v)):
        t = need_tensor(name, t)
        need_device(name, t, q.device)
        need_ndim(name, t, 3, f"[total_k, h_kv, d_{'qk' if name == 'k' else 'v'}]")
        if t.dtype != q.dtype:
            raise DTypeError(name, f"dtype must equal q's ({q.dtype})", t.dtype)
        need_last_dim_contiguous(name, t)
    _, h_q, d = q.shape
    h_kv = k.shape[1]
    need_size("k", k, 2, d, "q's head dim")
    need_size("v", v, 0, k.shape[0], "k's total_k")
    need_size("v", v, 1, h_kv, "k's h_kv")
    need_positive("q", q, 1, "h_q")
    need_positive("k", k, 1, "h_kv")
    if h_q % h_kv != 0:
        raise ShapeError("q", f"h_q must be a multiple of h_kv = {h_kv}", h_q)
    cu_q = need_tensor("cu_seqlens_qo", cu_seqlens_q)
    need_ndim("cu_seqlens_qo", cu_q, 1, "[b + 1]")
    need_positive("cu_seqlens_qo", cu_q, 0, "b + 1")
    cu_q = need_int_vector("cu_seqlens_qo", cu_q, cu_q.shape[0], q.device, "b + 1")
    cu_k = need_int_vector("cu_seqlens_kv", cu_seqlens_k, cu_q.shape[0], q.device, "b + 1")
    for name, value in (("max_seqlen_qo", max_seqlen_q), ("max_seqlen_kv", max_seqlen_k)):
        # torch.compile passes a SymInt once a length has been seen to vary
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise InvalidArgumentError(name, "must be a non-negative int", value)
    need_no_dropout(dropout_p)
    causal = need_bool("causal", causal)
    features = {"causal"} if causal else set()
    if h_kv != h_q:
        features.add("gqa")
    facts = Facts(
        "mha_backward" if backward else "mha_forward", q.device, q.dtype, None,
        (d, v.shape[2]), h_q, h_kv, 0, None, None, frozenset(features),
    )  # fmt: skip
    return MhaProblem(
        facts, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
        need_scale("softmax_scale", softmax_scale, d**-0.5), causal,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Paged-cache write


@dataclass(eq=False, slots=True)
class CacheWriteProblem:
    facts: Facts
    kv_cache: torch.Tensor  # [num_blocks, B, h_kv, width]
    new_kv: torch.Tensor  # [n, h_kv, d]
    slot_mapping: torch.Tensor  # [n] int32/int64 flat slots; out of range = skipped
    cache_format: CacheFormat


def build_cache_write(
    kv_cache: object, new_kv: object, slot_mapping: object, is_fp8: bool
) -> CacheWriteProblem:
    new_kv = need_tensor("new_kv", new_kv)
    need_ndim("new_kv", new_kv, 3, "[num_tokens, h_kv, d]")
    kv_cache = need_tensor("kv_cache", kv_cache)
    need_device("kv_cache", kv_cache, new_kv.device, "new_kv")
    need_ndim("kv_cache", kv_cache, 4, "[num_blocks, page_block_size, h_kv, width]")
    need_page_size("kv_cache", kv_cache)
    fmt = detect_cache_format("kv_cache", kv_cache, is_fp8)
    if fmt.is_fp8:
        need_dtype("new_kv", new_kv, (torch.bfloat16,))
        need_size("new_kv", new_kv, 2, fmt.head_dim, f"the {fmt} head dim")
    else:
        need_dtype("new_kv", new_kv, (kv_cache.dtype,))
        need_size("new_kv", new_kv, 2, kv_cache.shape[3], "kv_cache's head dim")
    need_size("new_kv", new_kv, 1, kv_cache.shape[2], "kv_cache's h_kv")
    slots = need_tensor("slot_mapping", slot_mapping)
    need_device("slot_mapping", slots, new_kv.device, "new_kv")
    need_dtype("slot_mapping", slots, (torch.int32, torch.int64))
    need_ndim("slot_mapping", slots, 1, "[num_tokens]")
    need_size("slot_mapping", slots, 0, new_kv.shape[0], "new_kv's num_tokens")
    facts = Facts(
        "cache_write", new_kv.device, new_kv.dtype, fmt, (new_kv.shape[2], 0), 0,
        kv_cache.shape[2], 0, kv_cache.shape[1], None, frozenset(),
    )  # fmt: skip
    return CacheWriteProblem(facts, kv_cache, new_kv, slots, fmt)
