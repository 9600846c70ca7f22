"""The public functions, with FlashMLA's names, signatures and semantics."""

from __future__ import annotations

import torch
from torch import Tensor

from . import execute, ops, problems
from .errors import InvalidArgumentError
from .scheduler import (
    SchedMeta,
    dense_num_parts,
    device_sm_count,
    sparse_lengths,
    sparse_num_parts,
    split_kv_schedule,
)


def get_mla_metadata(*args, **kwargs) -> tuple[SchedMeta, None] | tuple[Tensor, Tensor]:
    """Scheduling metadata for :func:`flash_mla_with_kvcache`.

    * ``get_mla_metadata()`` (FlashMLA >= Jan 2026): returns ``(SchedMeta(), None)``; the
      schedule is computed by the first decode call that receives the object and reused by
      later ones (which must have the same config). Use one per decoding step.
    * ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
      is_fp8_kvcache=False, topk=None)`` (the older form): computes the schedule now and returns
      ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``.
    """
    if not args and not kwargs:
        return SchedMeta(), None
    return _eager_metadata(*args, **kwargs)


def _eager_metadata(
    cache_seqlens: Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> tuple[Tensor, Tensor]:
    cache_seqlens = problems.need_tensor("cache_seqlens", cache_seqlens)
    problems.need_ndim("cache_seqlens", cache_seqlens, 1, "[b]")
    problems.need_int_vector(
        "cache_seqlens", cache_seqlens, cache_seqlens.shape[0], cache_seqlens.device, "b"
    )
    for name, value in (
        ("num_q_tokens_per_head_k", num_q_tokens_per_head_k),
        ("num_heads_k", num_heads_k),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(name, "must be a positive int", value)
    num_sms = device_sm_count(cache_seqlens.device)
    if topk is None:
        parts = dense_num_parts(num_sms, num_q_tokens_per_head_k, num_heads_k)
        return tuple(split_kv_schedule(cache_seqlens, parts))
    if num_heads_q is None:
        raise InvalidArgumentError("num_heads_q", "is required when topk is given (sparse decode)")
    s_q = max(num_q_tokens_per_head_k * num_heads_k // num_heads_q, 1)
    lengths = sparse_lengths(topk, None, None, None, cache_seqlens.shape[0], cache_seqlens.device)
    return tuple(split_kv_schedule(lengths, sparse_num_parts(num_sms, s_q, num_heads_q)))


def flash_mla_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor | None,
    cache_seqlens: Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: SchedMeta | Tensor | None,
    num_splits: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Tensor | None = None,
    attn_sink: Tensor | None = None,
    extra_k_cache: Tensor | None = None,
    extra_indices_in_kvcache: Tensor | None = None,
    topk_length: Tensor | None = None,
    extra_topk_length: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MLA decode attention over a paged KV cache. Returns ``(out, lse)``.

    Dense (``indices`` is None): ``q [b, s_q, h_q, 576]`` bf16/fp16 attends to the first
    ``cache_seqlens[i]`` tokens of request i, found through ``block_table``; V is the first 512
    dims of each cached row. ``causal`` (s_q > 1) is bottom-right aligned. With
    ``is_fp8_kvcache=True`` the cache holds FP8 records (either layout of :mod:`flashmla.formats`).

    Sparse (``indices [b, s_q, topk]`` flat cache slots given): each query row attends to its
    listed tokens; ``-1`` and out-of-range entries are skipped; ``topk_length``, ``attn_sink`` and
    an extra cache (``extra_k_cache`` + ``extra_indices_in_kvcache`` [+ ``extra_topk_length``])
    work as in FlashMLA.

    ``out`` is ``[b, s_q, h_q, 512]``; ``lse`` (natural log, ``+inf`` and ``out = 0`` for rows that
    see no key) is ``[b, h_q, s_q]``. ``tile_scheduler_metadata`` is what
    :func:`get_mla_metadata` returned (either form), or None.
    """
    if torch.compiler.is_compiling():
        # Inside torch.compile a SchedMeta cannot enter the graph; the op plans per call instead.
        md = tile_scheduler_metadata if isinstance(tile_scheduler_metadata, Tensor) else None
        return ops.with_kvcache(
            q, k_cache, block_table, cache_seqlens, head_dim_v, md, num_splits, softmax_scale,
            causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache, extra_indices_in_kvcache,
            topk_length, extra_topk_length,
        )  # fmt: skip
    return ops.with_kvcache_eager(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
        extra_indices_in_kvcache, topk_length, extra_topk_length,
    )  # fmt: skip


def flash_mla_sparse_fwd(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Tensor | None = None,
    topk_length: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-sparse prefill: ``q [s_q, h_q, d_qk]`` attends to ``kv[indices[t, 0, :]]``.

    Indices outside ``[0, s_kv)`` and positions ``>= topk_length[t]`` are skipped. Returns
    ``(out [s_q, h_q, 512] bf16, max_logits [s_q, h_q], lse [s_q, h_q])`` in natural-log units
    (``-inf`` / ``+inf`` for rows with no valid index; their output is 0). ``attn_sink`` scales
    the output by ``1 / (1 + exp(sink - lse))`` and changes neither statistic.
    """
    if torch.compiler.is_compiling():
        return ops.sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    p = problems.build_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    return execute.run_sparse_prefill(p)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_qo: Tensor,
    cu_seqlens_kv: Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> tuple[Tensor, Tensor]:
    """Dense MHA prefill over packed variable-length sequences, differentiable in q, k, v.

    ``q [total_q, h_q, d_qk]``, ``k [total_k, h_kv, d_qk]``, ``v [total_k, h_kv, d_v]``; sequence i
    is rows ``cu_seqlens[i] .. cu_seqlens[i+1]``. Causal masking is bottom-right aligned. Returns
    ``out [total_q, h_q, d_v]`` and ``lse [total_q, h_q]`` (float32, natural log, stride
    ``(1, total_q)``). ``deterministic`` and ``is_varlen`` are accepted for compatibility: every
    backend's backward is deterministic or declares otherwise, and lengths always come from
    ``cu_seqlens``.
    """
    problems.need_bool("deterministic", deterministic)
    problems.need_bool("is_varlen", is_varlen)
    if torch.compiler.is_compiling():
        # The op's fake implementation validates; here a varying softmax_scale is a symbolic
        # float that the eager checks (math.isfinite) cannot trace.
        problems.need_no_dropout(dropout_p)
    else:
        problems.build_mha(
            q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv, dropout_p,
            softmax_scale, causal,
        )  # fmt: skip
    return ops.mha_forward(
        q, k, v, cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv, softmax_scale, causal
    )


def _need_head_dim_qk(head_dim_qk: object, width: int, parts: int) -> int:
    if (
        isinstance(head_dim_qk, bool)
        or not isinstance(head_dim_qk, int)
        or not 0 < head_dim_qk * parts < width
    ):
        raise InvalidArgumentError(
            "head_dim_qk",
            f"must be a positive int below 1/{parts} of the packed width {width}",
            head_dim_qk,
        )
    return head_dim_qk


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` on ``qkv [total, h, 2 * d_qk + d_v]`` (sliced on the last dim)."""
    qkv = problems.need_tensor("qkv", qkv)
    d = _need_head_dim_qk(head_dim_qk, qkv.shape[-1], 2)
    return flash_attn_varlen_func(
        qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :], cu_seqlens, cu_seqlens, max_seqlen,
        max_seqlen, dropout_p, softmax_scale, causal, deterministic, is_varlen,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_qo: Tensor,
    cu_seqlens_kv: Tensor,
    max_seqlen_qo: int,
    max_seqlen_kv: int,
    head_dim_qk: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    deterministic: bool = False,
    is_varlen: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`flash_attn_varlen_func` with ``kv [total_k, h_kv, d_qk + d_v]`` (sliced on the last dim)."""
    kv = problems.need_tensor("kv", kv)
    d = _need_head_dim_qk(head_dim_qk, kv.shape[-1], 1)
    return flash_attn_varlen_func(
        q, kv[..., :d], kv[..., d:], cu_seqlens_qo, cu_seqlens_kv, max_seqlen_qo, max_seqlen_kv,
        dropout_p, softmax_scale, causal, deterministic, is_varlen,
    )  # fmt: skip


__all__ = [
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
]
