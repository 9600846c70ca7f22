"""Every public function rejects bad arguments with a typed error that names the argument and
states the rule (contract §4, §13.8).

Each row of :data:`ROWS` starts from valid inputs made by :mod:`flashmla.testing` (checked by
``test_base_inputs_are_valid``) and breaks exactly one thing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

import flashmla
from flashmla import testing as T
from flashmla.errors import (
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

Inputs = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Valid inputs (tiny), built once; rows copy the dict and replace entries, never mutate tensors.


@functools.cache
def _dense() -> Inputs:
    return T.dense_decode_inputs(2, 2, 4, 20, page_block_size=16, causal=True)


@functools.cache
def _dense_fp8() -> Inputs:
    return T.dense_decode_inputs(2, 1, 2, 20, page_block_size=16, cache_format="fp8_v32")


@functools.cache
def _sparse() -> Inputs:
    return T.sparse_decode_inputs(2, 2, 4, 8, page_block_size=16)


@functools.cache
def _sparse_extra() -> Inputs:
    return T.sparse_decode_inputs(
        2, 2, 4, 8, cache_format="fp8_model1", page_block_size=16, topk_length=True,
        attn_sink=True, extra_topk=8, extra_page_block_size=16, extra_topk_length=True,
    )  # fmt: skip


@functools.cache
def _sparse_bf16() -> Inputs:
    return T.sparse_decode_inputs(2, 1, 4, 8, cache_format="bf16", page_block_size=16)


@functools.cache
def _prefill() -> Inputs:
    return T.sparse_prefill_inputs(3, 16, 2, 8, attn_sink=True, topk_length=True)


@functools.cache
def _mha() -> Inputs:
    return T.mha_inputs(2, 2, 3, 4, h_kv=2, d_qk=16, d_v=8)


@functools.cache
def _qkvpacked() -> Inputs:
    m = T.mha_inputs(2, 3, 3, 2, d_qk=16, d_v=8)
    return dict(
        qkv=torch.cat([m["q"], m["k"], m["v"]], dim=-1),
        cu_seqlens=m["cu_seqlens_qo"],
        max_seqlen=m["max_seqlen_qo"],
        head_dim_qk=16,
    )


@functools.cache
def _kvpacked() -> Inputs:
    m = _mha()
    return dict(
        q=m["q"],
        kv=torch.cat([m["k"], m["v"]], dim=-1),
        cu_seqlens_qo=m["cu_seqlens_qo"],
        cu_seqlens_kv=m["cu_seqlens_kv"],
        max_seqlen_qo=m["max_seqlen_qo"],
        max_seqlen_kv=m["max_seqlen_kv"],
        head_dim_qk=16,
    )


@functools.cache
def _metadata() -> Inputs:
    return dict(
        cache_seqlens=torch.tensor([5, 90], dtype=torch.int32),
        num_q_tokens_per_head_k=4,
        num_heads_k=1,
    )


@functools.cache
def _write_bf16() -> Inputs:
    return dict(
        kv_cache=flashmla.allocate_paged_cache(2, 4, head_dim=16),
        new_kv=torch.randn(3, 1, 16).bfloat16(),
        slot_mapping=torch.tensor([0, 5, -1], dtype=torch.int32),
    )


@functools.cache
def _write_fp8() -> Inputs:
    return dict(
        kv_cache=flashmla.allocate_paged_cache(2, 4, cache_format="fp8_v32"),
        new_kv=torch.randn(3, 1, 576).bfloat16(),
        slot_mapping=torch.tensor([0, 5, 7], dtype=torch.int64),
    )


def _call_write(**kw: Any) -> None:
    # The tables above are shared: write into a copy of the cache.
    cache = kw.pop("kv_cache")
    if isinstance(cache, torch.Tensor) and cache.device.type != "meta":
        cache = torch.empty_strided(cache.shape, cache.stride(), dtype=cache.dtype).copy_(cache)
    flashmla.write_kv_cache(cache, **kw)


CALLS: dict[str, tuple[Callable[[], Inputs], Callable[..., Any]]] = {
    "dense": (_dense, flashmla.flash_mla_with_kvcache),
    "dense_fp8": (_dense_fp8, flashmla.flash_mla_with_kvcache),
    "sparse": (_sparse, flashmla.flash_mla_with_kvcache),
    "sparse_extra": (_sparse_extra, flashmla.flash_mla_with_kvcache),
    "sparse_bf16": (_sparse_bf16, flashmla.flash_mla_with_kvcache),
    "prefill": (_prefill, flashmla.flash_mla_sparse_fwd),
    "mha": (_mha, flashmla.flash_attn_varlen_func),
    "qkvpacked": (_qkvpacked, flashmla.flash_attn_varlen_qkvpacked_func),
    "kvpacked": (_kvpacked, flashmla.flash_attn_varlen_kvpacked_func),
    "metadata": (_metadata, flashmla.get_mla_metadata),
    "write_bf16": (_write_bf16, _call_write),
    "write_fp8": (_write_fp8, _call_write),
}

# --------------------------------------------------------------------------------------------
# Ways to break a tensor


def last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, last-dim stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


def strided_1d(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous 1-D copy (stride 2)."""
    return torch.stack([t, t], dim=-1)[..., 0]


def fp8_padded_rows(cache: torch.Tensor, width: int = 700) -> torch.Tensor:
    """An FP8 cache whose token rows are ``width`` bytes apart (stride(1) != bytes per token)."""
    nb, page, h, w = cache.shape
    buf = torch.zeros(nb, page, h, width, dtype=cache.dtype)
    view = buf[..., :w]
    view.copy_(cache)
    return view


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def repeat_heads(cache: torch.Tensor, n: int) -> torch.Tensor:
    return cache.repeat(1, 1, n, 1)


def fp8_cache(width: int, h_kv: int = 1, page: int = 16) -> torch.Tensor:
    return torch.zeros(4, page, h_kv, width, dtype=torch.uint8)


def _with(**changes: Callable[[Inputs], Any]) -> Callable[[Inputs], Inputs]:
    """A mutator: each keyword maps the base inputs to the argument's new value."""

    def mutate(base: Inputs) -> Inputs:
        out = dict(base)
        for key, make in changes.items():
            out[key] = make(base)
        return out

    return mutate


def _old_metadata(base: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    _, s_q, h_q, _ = base["q"].shape
    h_kv = base["k_cache"].shape[2]
    return flashmla.get_mla_metadata(base["cache_seqlens"], s_q * h_q // h_kv, h_kv)


def row(
    id: str, call: str, mutate: Callable[[Inputs], Inputs], exc: type, argument: str, rule: str
) -> Any:
    return pytest.param(call, mutate, exc, argument, rule, id=id)


I32 = torch.int32
ROWS = [
    # ---- dense decode: q
    row("dense-q-float32", "dense", _with(q=lambda b: b["q"].float()), DTypeError, "q", "dtype must be bfloat16 or float16"),
    row("dense-q-rank3", "dense", _with(q=lambda b: b["q"][0]), ShapeError, "q", "must have 4 dims"),
    row("dense-q-not-a-tensor", "dense", _with(q=lambda b: b["q"].tolist()), InvalidArgumentError, "q", "must be a torch.Tensor"),
    row("dense-q-batch-0", "dense", _with(q=lambda b: b["q"][:0]), ShapeError, "q", "b (shape[0]) must be at least 1"),
    row("dense-q-last-dim-strided", "dense", _with(q=lambda b: last_dim_strided(b["q"])), LayoutError, "q", "last dimension must be contiguous"),
    row("dense-head-dim-512", "dense", _with(q=lambda b: b["q"][..., :512].contiguous(), k_cache=lambda b: b["k_cache"][..., :512].contiguous()), ShapeError, "q", "d_qk = 576"),
    row("dense-h_q-not-multiple-of-h_kv", "dense", _with(q=lambda b: b["q"][:, :, :3].contiguous(), k_cache=lambda b: repeat_heads(b["k_cache"], 2)), ShapeError, "q", "h_q must be a multiple"),
    row("dense-head_dim_v-576", "dense", _with(head_dim_v=lambda b: 576), InvalidArgumentError, "head_dim_v", "must be 512"),
    # ---- dense decode: k_cache
    row("dense-cache-dtype-differs-from-q", "dense", _with(k_cache=lambda b: b["k_cache"].half()), DTypeError, "k_cache", "dtype must equal q's"),
    row("dense-cache-float32", "dense", _with(k_cache=lambda b: b["k_cache"].float()), DTypeError, "k_cache", "a plain cache must be bfloat16 or float16"),
    row("dense-cache-rank3", "dense", _with(k_cache=lambda b: b["k_cache"][0]), ShapeError, "k_cache", "must have 4 dims"),
    row("dense-cache-head-dim-differs", "dense", _with(k_cache=lambda b: b["k_cache"][..., :512].contiguous()), ShapeError, "k_cache", "shape[3] must equal q's head dim"),
    row("dense-page-size-0", "dense", _with(k_cache=lambda b: b["k_cache"][:, :0]), ShapeError, "k_cache", "page block size (shape[1]) must be in 1..1024"),
    row("dense-page-size-1025", "dense", _with(k_cache=lambda b: torch.zeros(1, 1025, 1, 576, dtype=torch.bfloat16)), ShapeError, "k_cache", "page block size (shape[1]) must be in 1..1024"),
    row("dense-cache-last-dim-strided", "dense", _with(k_cache=lambda b: last_dim_strided(b["k_cache"])), LayoutError, "k_cache", "last dimension must be contiguous"),
    row("dense-cache-on-meta", "dense", _with(k_cache=lambda b: meta(b["k_cache"])), DeviceError, "k_cache", "same device as q"),
    # ---- dense decode: block_table / cache_seqlens
    row("dense-block_table-int64", "dense", _with(block_table=lambda b: b["block_table"].long()), DTypeError, "block_table", "dtype must be int32"),
    row("dense-block_table-wrong-b", "dense", _with(block_table=lambda b: b["block_table"][:1]), ShapeError, "block_table", "shape[0] must equal b"),
    row("dense-block_table-rank1", "dense", _with(block_table=lambda b: b["block_table"][0]), ShapeError, "block_table", "must have 2 dims"),
    row("dense-block_table-None", "dense", _with(block_table=lambda b: None), InvalidArgumentError, "block_table", "must be a torch.Tensor"),
    row("dense-block_table-last-dim-strided", "dense", _with(block_table=lambda b: last_dim_strided(b["block_table"])), LayoutError, "block_table", "last dimension must be contiguous"),
    row("dense-block_table-on-meta", "dense", _with(block_table=lambda b: meta(b["block_table"])), DeviceError, "block_table", "same device as q"),
    row("dense-cache_seqlens-int64", "dense", _with(cache_seqlens=lambda b: b["cache_seqlens"].long()), DTypeError, "cache_seqlens", "dtype must be int32"),
    row("dense-cache_seqlens-non-contiguous", "dense", _with(cache_seqlens=lambda b: strided_1d(b["cache_seqlens"])), LayoutError, "cache_seqlens", "must be contiguous"),
    row("dense-cache_seqlens-wrong-b", "dense", _with(cache_seqlens=lambda b: b["cache_seqlens"].repeat(2)), ShapeError, "cache_seqlens", "shape[0] must equal b"),
    row("dense-cache_seqlens-on-meta", "dense", _with(cache_seqlens=lambda b: meta(b["cache_seqlens"])), DeviceError, "cache_seqlens", "same device as q"),
    # ---- dense decode: scalars
    row("dense-causal-int", "dense", _with(causal=lambda b: 1), InvalidArgumentError, "causal", "must be a bool"),
    row("dense-softmax_scale-nan", "dense", _with(softmax_scale=lambda b: float("nan")), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    row("dense-softmax_scale-inf", "dense", _with(softmax_scale=lambda b: float("inf")), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    row("dense-softmax_scale-str", "dense", _with(softmax_scale=lambda b: "0.1"), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    row("dense-softmax_scale-bool", "dense", _with(softmax_scale=lambda b: True), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    # ---- dense decode: scheduling metadata
    row("dense-num_splits-with-SchedMeta", "dense", _with(tile_scheduler_metadata=lambda b: flashmla.SchedMeta(), num_splits=lambda b: _old_metadata(b)[1]), InvalidArgumentError, "num_splits", "must be None unless tile_scheduler_metadata is a tensor"),
    row("dense-num_splits-without-metadata", "dense", _with(num_splits=lambda b: _old_metadata(b)[1]), InvalidArgumentError, "num_splits", "must be None unless tile_scheduler_metadata is a tensor"),
    row("dense-metadata-without-num_splits", "dense", _with(tile_scheduler_metadata=lambda b: _old_metadata(b)[0]), InvalidArgumentError, "num_splits", "is required with tensor tile_scheduler_metadata"),
    row("dense-metadata-width-7", "dense", _with(tile_scheduler_metadata=lambda b: _old_metadata(b)[0][:, :7].contiguous(), num_splits=lambda b: _old_metadata(b)[1]), ShapeError, "tile_scheduler_metadata", "shape[1] must equal the metadata row width = 8"),
    row("dense-metadata-int64", "dense", _with(tile_scheduler_metadata=lambda b: _old_metadata(b)[0].long(), num_splits=lambda b: _old_metadata(b)[1]), DTypeError, "tile_scheduler_metadata", "dtype must be int32"),
    row("dense-metadata-non-contiguous", "dense", _with(tile_scheduler_metadata=lambda b: _old_metadata(b)[0].t().contiguous().t(), num_splits=lambda b: _old_metadata(b)[1]), LayoutError, "tile_scheduler_metadata", "must be contiguous"),
    row("dense-num_splits-wrong-size", "dense", _with(tile_scheduler_metadata=lambda b: _old_metadata(b)[0], num_splits=lambda b: _old_metadata(b)[1][:-1].contiguous()), ShapeError, "num_splits", "shape[0] must equal b + 1"),
    # ---- dense decode: sparse-only arguments
    row("dense-with-attn_sink", "dense", _with(attn_sink=lambda b: torch.zeros(4)), InvalidArgumentError, "attn_sink", "only valid for sparse decode"),
    row("dense-with-topk_length", "dense", _with(topk_length=lambda b: torch.ones(2, dtype=I32)), InvalidArgumentError, "topk_length", "only valid for sparse decode"),
    row("dense-with-extra_k_cache", "dense", _with(extra_k_cache=lambda b: b["k_cache"]), InvalidArgumentError, "extra_k_cache", "only valid for sparse decode"),
    row("dense-with-extra_indices", "dense", _with(extra_indices_in_kvcache=lambda b: torch.zeros(2, 2, 8, dtype=I32)), InvalidArgumentError, "extra_indices_in_kvcache", "only valid for sparse decode"),
    row("dense-with-extra_topk_length", "dense", _with(extra_topk_length=lambda b: torch.ones(2, dtype=I32)), InvalidArgumentError, "extra_topk_length", "only valid for sparse decode"),
    # ---- dense decode: FP8 caches
    row("dense-fp8-flag-with-bf16-cache", "dense", _with(is_fp8_kvcache=lambda b: True), DTypeError, "k_cache", "an FP8 cache must be float8_e4m3fn, int8 or uint8"),
    row("dense-fp8-bytes-without-flag", "dense_fp8", _with(is_fp8_kvcache=lambda b: False), DTypeError, "k_cache", "a plain cache must be bfloat16 or float16"),
    row("dense-fp8-width-600", "dense_fp8", _with(k_cache=lambda b: fp8_cache(600)), ShapeError, "k_cache", "656 (V3.2 layout) or 584 (MODEL1 layout)"),
    row("dense-fp8-width-576", "dense_fp8", _with(k_cache=lambda b: fp8_cache(576)), ShapeError, "k_cache", "656 (V3.2 layout) or 584 (MODEL1 layout)"),
    row("dense-fp8-two-kv-heads", "dense_fp8", _with(k_cache=lambda b: fp8_cache(656, h_kv=2)), ShapeError, "k_cache", "one KV head"),
    row("dense-fp8-row-stride-700", "dense_fp8", _with(k_cache=lambda b: fp8_padded_rows(b["k_cache"])), LayoutError, "k_cache", "stride(1) == bytes per token"),
    row("dense-fp8-q-fp16", "dense_fp8", _with(q=lambda b: b["q"].half()), DTypeError, "q", "dtype must be bfloat16"),
    row("dense-fp8-v32-q-dim-512", "dense_fp8", _with(q=lambda b: b["q"][..., :512].contiguous()), ShapeError, "q", "head dim must be 576 for an fp8_v32 cache"),
    # ---- sparse decode
    row("sparse-causal-true", "sparse", _with(causal=lambda b: True), InvalidArgumentError, "causal", "must be False for sparse decode"),
    row("sparse-causal-str", "sparse", _with(causal=lambda b: "no"), InvalidArgumentError, "causal", "must be a bool"),
    row("sparse-q-fp16", "sparse_bf16", _with(q=lambda b: b["q"].half(), k_cache=lambda b: b["k_cache"].half()), DTypeError, "q", "dtype must be bfloat16"),
    row("sparse-q-dim-256", "sparse_bf16", _with(q=lambda b: b["q"][..., :256].contiguous(), k_cache=lambda b: b["k_cache"][..., :256].contiguous()), ShapeError, "q", "576 (V3.2) or 512 (MODEL1)"),
    row("sparse-q-s_q-0", "sparse", _with(q=lambda b: b["q"][:, :0]), ShapeError, "q", "s_q (shape[1]) must be at least 1"),
    row("sparse-two-kv-heads", "sparse_bf16", _with(k_cache=lambda b: repeat_heads(b["k_cache"], 2)), ShapeError, "k_cache", "h_kv (shape[2]) must be 1"),
    row("sparse-head_dim_v-576", "sparse", _with(head_dim_v=lambda b: 576), InvalidArgumentError, "head_dim_v", "must be 512"),
    row("sparse-fp8-row-stride-700", "sparse", _with(k_cache=lambda b: fp8_padded_rows(b["k_cache"])), LayoutError, "k_cache", "stride(1) == bytes per token"),
    row("sparse-page-size-1025", "sparse", _with(k_cache=lambda b: fp8_cache(656, page=1025)), ShapeError, "k_cache", "page block size (shape[1]) must be in 1..1024"),
    row("sparse-indices-int64", "sparse", _with(indices=lambda b: b["indices"].long()), DTypeError, "indices", "dtype must be int32"),
    row("sparse-indices-rank2", "sparse", _with(indices=lambda b: b["indices"][0]), ShapeError, "indices", "must have 3 dims"),
    row("sparse-indices-wrong-b", "sparse", _with(indices=lambda b: b["indices"][:1]), ShapeError, "indices", "shape[0] must equal b"),
    row("sparse-indices-wrong-s_q", "sparse", _with(indices=lambda b: b["indices"][:, :1]), ShapeError, "indices", "shape[1] must equal s_q"),
    row("sparse-indices-topk-0", "sparse", _with(indices=lambda b: b["indices"][..., :0]), ShapeError, "indices", "topk (shape[2]) must be at least 1"),
    row("sparse-indices-last-dim-strided", "sparse", _with(indices=lambda b: last_dim_strided(b["indices"])), LayoutError, "indices", "last dimension must be contiguous"),
    row("sparse-indices-on-meta", "sparse", _with(indices=lambda b: meta(b["indices"])), DeviceError, "indices", "same device as q"),
    row("sparse-topk_length-int64", "sparse_extra", _with(topk_length=lambda b: b["topk_length"].long()), DTypeError, "topk_length", "dtype must be int32"),
    row("sparse-topk_length-non-contiguous", "sparse_extra", _with(topk_length=lambda b: strided_1d(b["topk_length"])), LayoutError, "topk_length", "must be contiguous"),
    row("sparse-topk_length-wrong-b", "sparse_extra", _with(topk_length=lambda b: b["topk_length"][:1]), ShapeError, "topk_length", "shape[0] must equal b"),
    row("sparse-attn_sink-bf16", "sparse_extra", _with(attn_sink=lambda b: b["attn_sink"].bfloat16()), DTypeError, "attn_sink", "dtype must be float32"),
    row("sparse-attn_sink-non-contiguous", "sparse_extra", _with(attn_sink=lambda b: strided_1d(b["attn_sink"])), LayoutError, "attn_sink", "must be contiguous"),
    row("sparse-attn_sink-wrong-h_q", "sparse_extra", _with(attn_sink=lambda b: b["attn_sink"][:3]), ShapeError, "attn_sink", "shape[0] must equal h_q"),
    row("sparse-extra_indices-without-extra-cache", "sparse", _with(extra_indices_in_kvcache=lambda b: b["indices"]), InvalidArgumentError, "extra_indices_in_kvcache", "needs extra_k_cache"),
    row("sparse-extra_topk_length-without-extra-cache", "sparse", _with(extra_topk_length=lambda b: torch.ones(2, dtype=I32)), InvalidArgumentError, "extra_topk_length", "needs extra_k_cache"),
    row("sparse-extra-cache-without-indices", "sparse_extra", _with(extra_indices_in_kvcache=lambda b: None), InvalidArgumentError, "extra_indices_in_kvcache", "is required with extra_k_cache"),
    row("sparse-extra-cache-other-fp8-format", "sparse", _with(extra_k_cache=lambda b: _sparse_extra()["k_cache"], extra_indices_in_kvcache=lambda b: b["indices"]), InvalidArgumentError, "extra_k_cache", "must use k_cache's format (fp8_v32)"),
    row("sparse-extra-cache-bf16-with-fp8", "sparse_extra", _with(extra_k_cache=lambda b: torch.zeros(4, 16, 1, 512, dtype=torch.bfloat16)), DTypeError, "extra_k_cache", "an FP8 cache must be"),
    row("sparse-extra-cache-row-stride", "sparse_extra", _with(extra_k_cache=lambda b: fp8_padded_rows(b["extra_k_cache"])), LayoutError, "extra_k_cache", "stride(1) == bytes per token"),
    row("sparse-extra_indices-wrong-s_q", "sparse_extra", _with(extra_indices_in_kvcache=lambda b: b["extra_indices_in_kvcache"][:, :1]), ShapeError, "extra_indices_in_kvcache", "shape[1] must equal s_q"),
    row("sparse-extra_indices-int64", "sparse_extra", _with(extra_indices_in_kvcache=lambda b: b["extra_indices_in_kvcache"].long()), DTypeError, "extra_indices_in_kvcache", "dtype must be int32"),
    row("sparse-extra_topk_length-int64", "sparse_extra", _with(extra_topk_length=lambda b: b["extra_topk_length"].long()), DTypeError, "extra_topk_length", "dtype must be int32"),
    row("sparse-extra_topk_length-non-contiguous", "sparse_extra", _with(extra_topk_length=lambda b: strided_1d(b["extra_topk_length"])), LayoutError, "extra_topk_length", "must be contiguous"),
    row("sparse-softmax_scale-nan", "sparse", _with(softmax_scale=lambda b: float("nan")), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    row("sparse-num_splits-with-SchedMeta", "sparse", _with(tile_scheduler_metadata=lambda b: flashmla.SchedMeta(), num_splits=lambda b: torch.zeros(3, dtype=I32)), InvalidArgumentError, "num_splits", "must be None unless"),
    # ---- sparse prefill
    row("prefill-q-rank4", "prefill", _with(q=lambda b: b["q"][None]), ShapeError, "q", "must have 3 dims"),
    row("prefill-q-fp16", "prefill", _with(q=lambda b: b["q"].half()), DTypeError, "q", "dtype must be bfloat16"),
    row("prefill-q-last-dim-strided", "prefill", _with(q=lambda b: last_dim_strided(b["q"])), LayoutError, "q", "last dimension must be contiguous"),
    row("prefill-q-dim-256", "prefill", _with(q=lambda b: b["q"][..., :256].contiguous(), kv=lambda b: b["kv"][..., :256].contiguous()), ShapeError, "q", "d_qk = 576 or 512"),
    row("prefill-d_v-256", "prefill", _with(d_v=lambda b: 256), InvalidArgumentError, "d_v", "must be 512"),
    row("prefill-kv-fp16", "prefill", _with(kv=lambda b: b["kv"].half()), DTypeError, "kv", "dtype must be bfloat16"),
    row("prefill-kv-two-heads", "prefill", _with(kv=lambda b: b["kv"].repeat(1, 2, 1)), ShapeError, "kv", "shape[1] must equal h_kv"),
    row("prefill-kv-head-dim-differs", "prefill", _with(kv=lambda b: b["kv"][..., :512].contiguous()), ShapeError, "kv", "shape[2] must equal q's head dim"),
    row("prefill-kv-on-meta", "prefill", _with(kv=lambda b: meta(b["kv"])), DeviceError, "kv", "same device as q"),
    row("prefill-indices-int64", "prefill", _with(indices=lambda b: b["indices"].long()), DTypeError, "indices", "dtype must be int32"),
    row("prefill-indices-wrong-s_q", "prefill", _with(indices=lambda b: b["indices"][:2]), ShapeError, "indices", "shape[0] must equal s_q"),
    row("prefill-indices-h_kv-2", "prefill", _with(indices=lambda b: b["indices"].repeat(1, 2, 1)), ShapeError, "indices", "shape[1] must equal h_kv"),
    row("prefill-sm_scale-missing", "prefill", _with(sm_scale=lambda b: None), InvalidArgumentError, "sm_scale", "is required"),
    row("prefill-sm_scale-nan", "prefill", _with(sm_scale=lambda b: float("nan")), InvalidArgumentError, "sm_scale", "must be a finite float"),
    row("prefill-topk_length-wrong-size", "prefill", _with(topk_length=lambda b: b["topk_length"][:2]), ShapeError, "topk_length", "shape[0] must equal s_q"),
    row("prefill-topk_length-non-contiguous", "prefill", _with(topk_length=lambda b: strided_1d(b["topk_length"])), LayoutError, "topk_length", "must be contiguous"),
    row("prefill-attn_sink-float64", "prefill", _with(attn_sink=lambda b: b["attn_sink"].double()), DTypeError, "attn_sink", "dtype must be float32"),
    row("prefill-attn_sink-non-contiguous", "prefill", _with(attn_sink=lambda b: strided_1d(b["attn_sink"])), LayoutError, "attn_sink", "must be contiguous"),
    # ---- dense MHA prefill
    row("mha-q-float32", "mha", _with(q=lambda b: b["q"].float()), DTypeError, "q", "dtype must be bfloat16 or float16"),
    row("mha-q-rank4", "mha", _with(q=lambda b: b["q"][None]), ShapeError, "q", "must have 3 dims"),
    row("mha-q-last-dim-strided", "mha", _with(q=lambda b: last_dim_strided(b["q"])), LayoutError, "q", "last dimension must be contiguous"),
    row("mha-k-dtype-differs", "mha", _with(k=lambda b: b["k"].half()), DTypeError, "k", "dtype must equal q's"),
    row("mha-v-rank2", "mha", _with(v=lambda b: b["v"][0]), ShapeError, "v", "must have 3 dims"),
    row("mha-k-head-dim-differs", "mha", _with(k=lambda b: b["k"][..., :8].contiguous()), ShapeError, "k", "shape[2] must equal q's head dim"),
    row("mha-v-total_k-differs", "mha", _with(v=lambda b: b["v"][1:]), ShapeError, "v", "shape[0] must equal k's total_k"),
    row("mha-v-h_kv-differs", "mha", _with(v=lambda b: b["v"][:, :1].contiguous()), ShapeError, "v", "shape[1] must equal k's h_kv"),
    row("mha-h_q-not-multiple-of-h_kv", "mha", _with(q=lambda b: b["q"][:, :3].contiguous()), ShapeError, "q", "h_q must be a multiple of h_kv"),
    row("mha-k-on-meta", "mha", _with(k=lambda b: meta(b["k"])), DeviceError, "k", "same device as q"),
    row("mha-cu_seqlens_qo-int64", "mha", _with(cu_seqlens_qo=lambda b: b["cu_seqlens_qo"].long()), DTypeError, "cu_seqlens_qo", "dtype must be int32"),
    row("mha-cu_seqlens_qo-empty", "mha", _with(cu_seqlens_qo=lambda b: b["cu_seqlens_qo"][:0]), ShapeError, "cu_seqlens_qo", "b + 1 (shape[0]) must be at least 1"),
    row("mha-cu_seqlens_kv-wrong-size", "mha", _with(cu_seqlens_kv=lambda b: b["cu_seqlens_kv"][:2]), ShapeError, "cu_seqlens_kv", "shape[0] must equal b + 1"),
    row("mha-cu_seqlens_kv-non-contiguous", "mha", _with(cu_seqlens_kv=lambda b: strided_1d(b["cu_seqlens_kv"])), LayoutError, "cu_seqlens_kv", "must be contiguous"),
    row("mha-max_seqlen_qo-negative", "mha", _with(max_seqlen_qo=lambda b: -1), InvalidArgumentError, "max_seqlen_qo", "must be a non-negative int"),
    row("mha-max_seqlen_kv-float", "mha", _with(max_seqlen_kv=lambda b: 3.0), InvalidArgumentError, "max_seqlen_kv", "must be a non-negative int"),
    row("mha-dropout", "mha", _with(dropout_p=lambda b: 0.1), InvalidArgumentError, "dropout_p", "must be 0.0"),
    row("mha-causal-str", "mha", _with(causal=lambda b: "yes"), InvalidArgumentError, "causal", "must be a bool"),
    row("mha-deterministic-int", "mha", _with(deterministic=lambda b: 0), InvalidArgumentError, "deterministic", "must be a bool"),
    row("mha-is_varlen-None", "mha", _with(is_varlen=lambda b: None), InvalidArgumentError, "is_varlen", "must be a bool"),
    row("mha-softmax_scale-inf", "mha", _with(softmax_scale=lambda b: float("-inf")), InvalidArgumentError, "softmax_scale", "must be a finite float"),
    # ---- packed MHA variants
    row("qkvpacked-head_dim_qk-too-big", "qkvpacked", _with(head_dim_qk=lambda b: 20), InvalidArgumentError, "head_dim_qk", "below 1/2 of the packed width 40"),
    row("qkvpacked-head_dim_qk-0", "qkvpacked", _with(head_dim_qk=lambda b: 0), InvalidArgumentError, "head_dim_qk", "must be a positive int"),
    row("qkvpacked-head_dim_qk-float", "qkvpacked", _with(head_dim_qk=lambda b: 16.0), InvalidArgumentError, "head_dim_qk", "must be a positive int"),
    row("qkvpacked-qkv-not-a-tensor", "qkvpacked", _with(qkv=lambda b: None), InvalidArgumentError, "qkv", "must be a torch.Tensor"),
    row("qkvpacked-dropout", "qkvpacked", _with(dropout_p=lambda b: 0.5), InvalidArgumentError, "dropout_p", "must be 0.0"),
    row("qkvpacked-float32", "qkvpacked", _with(qkv=lambda b: b["qkv"].float()), DTypeError, "q", "dtype must be bfloat16 or float16"),
    row("kvpacked-head_dim_qk-whole-width", "kvpacked", _with(head_dim_qk=lambda b: 24), InvalidArgumentError, "head_dim_qk", "below 1/1 of the packed width 24"),
    row("kvpacked-kv-not-a-tensor", "kvpacked", _with(kv=lambda b: [1.0]), InvalidArgumentError, "kv", "must be a torch.Tensor"),
    row("kvpacked-causal-int", "kvpacked", _with(causal=lambda b: 1), InvalidArgumentError, "causal", "must be a bool"),
    # ---- get_mla_metadata (old form)
    row("metadata-cache_seqlens-int64", "metadata", _with(cache_seqlens=lambda b: b["cache_seqlens"].long()), DTypeError, "cache_seqlens", "dtype must be int32"),
    row("metadata-cache_seqlens-rank2", "metadata", _with(cache_seqlens=lambda b: b["cache_seqlens"][None]), ShapeError, "cache_seqlens", "must have 1 dims"),
    row("metadata-cache_seqlens-non-contiguous", "metadata", _with(cache_seqlens=lambda b: strided_1d(b["cache_seqlens"])), LayoutError, "cache_seqlens", "must be contiguous"),
    row("metadata-cache_seqlens-list", "metadata", _with(cache_seqlens=lambda b: [5, 90]), InvalidArgumentError, "cache_seqlens", "must be a torch.Tensor"),
    row("metadata-num_heads_k-0", "metadata", _with(num_heads_k=lambda b: 0), InvalidArgumentError, "num_heads_k", "must be a positive int"),
    row("metadata-num_q_tokens-float", "metadata", _with(num_q_tokens_per_head_k=lambda b: 4.0), InvalidArgumentError, "num_q_tokens_per_head_k", "must be a positive int"),
    row("metadata-topk-without-num_heads_q", "metadata", _with(topk=lambda b: 64), InvalidArgumentError, "num_heads_q", "is required when topk is given"),
    # ---- write_kv_cache
    row("write-new_kv-rank2", "write_bf16", _with(new_kv=lambda b: b["new_kv"][:, 0]), ShapeError, "new_kv", "must have 3 dims"),
    row("write-cache-rank3", "write_bf16", _with(kv_cache=lambda b: b["kv_cache"][0]), ShapeError, "kv_cache", "must have 4 dims"),
    row("write-page-size-0", "write_bf16", _with(kv_cache=lambda b: b["kv_cache"][:, :0]), ShapeError, "kv_cache", "page block size (shape[1]) must be in 1..1024"),
    row("write-cache-float32", "write_bf16", _with(kv_cache=lambda b: b["kv_cache"].float()), DTypeError, "kv_cache", "a plain cache must be bfloat16 or float16"),
    row("write-new_kv-dtype-differs", "write_bf16", _with(new_kv=lambda b: b["new_kv"].half()), DTypeError, "new_kv", "dtype must be bfloat16"),
    row("write-new_kv-head-dim-differs", "write_bf16", _with(new_kv=lambda b: b["new_kv"][..., :8].contiguous()), ShapeError, "new_kv", "shape[2] must equal kv_cache's head dim"),
    row("write-new_kv-h_kv-differs", "write_bf16", _with(new_kv=lambda b: b["new_kv"].repeat(1, 2, 1)), ShapeError, "new_kv", "shape[1] must equal kv_cache's h_kv"),
    row("write-slot_mapping-float", "write_bf16", _with(slot_mapping=lambda b: b["slot_mapping"].float()), DTypeError, "slot_mapping", "dtype must be int32 or int64"),
    row("write-slot_mapping-wrong-size", "write_bf16", _with(slot_mapping=lambda b: b["slot_mapping"][:2]), ShapeError, "slot_mapping", "shape[0] must equal new_kv's num_tokens"),
    row("write-slot_mapping-on-meta", "write_bf16", _with(slot_mapping=lambda b: meta(b["slot_mapping"])), DeviceError, "slot_mapping", "same device as new_kv"),
    row("write-cache-on-meta", "write_bf16", _with(kv_cache=lambda b: meta(b["kv_cache"])), DeviceError, "kv_cache", "same device as new_kv"),
    row("write-fp8-new_kv-fp16", "write_fp8", _with(new_kv=lambda b: b["new_kv"].half()), DTypeError, "new_kv", "dtype must be bfloat16"),
    row("write-fp8-new_kv-dim-512", "write_fp8", _with(new_kv=lambda b: b["new_kv"][..., :512].contiguous()), ShapeError, "new_kv", "the fp8_v32 head dim = 576"),
    row("write-fp8-row-stride-700", "write_fp8", _with(kv_cache=lambda b: fp8_padded_rows(b["kv_cache"])), LayoutError, "kv_cache", "stride(1) == bytes per token"),
    row("write-fp8-width-600", "write_fp8", _with(kv_cache=lambda b: fp8_cache(600)), ShapeError, "kv_cache", "656 (V3.2 layout) or 584 (MODEL1 layout)"),
]  # fmt: skip


@pytest.mark.parametrize("call, mutate, exc, argument, rule", ROWS)
def test_bad_argument(call: str, mutate: Callable, exc: type, argument: str, rule: str) -> None:
    make, fn = CALLS[call]
    inputs = mutate(make())
    with pytest.raises(InvalidArgumentError) as info:
        fn(**inputs)
    err = info.value
    assert type(err) is exc, f"raised {type(err).__name__}: {err}"
    assert err.argument == argument, str(err)
    assert rule in err.rule, f"rule {err.rule!r} does not state {rule!r}"
    assert str(err).startswith(f"{argument}: "), str(err)
    assert rule in str(err)


def test_table_is_large_and_ids_unique() -> None:
    ids = [p.id for p in ROWS]
    assert len(ids) >= 45
    assert len(set(ids)) == len(ids)
    covered = {p.values[0] for p in ROWS}
    assert covered == set(CALLS), f"no row for {set(CALLS) - covered}"


@pytest.mark.parametrize("call", sorted(CALLS))
def test_base_inputs_are_valid(call: str) -> None:
    """Each row breaks one thing of inputs that are otherwise accepted."""
    make, fn = CALLS[call]
    fn(**make())


def test_metadata_row_makes_a_valid_call() -> None:
    """The old-form metadata used by the rows above is itself accepted."""
    base = _dense()
    md, ns = _old_metadata(base)
    out, lse = flashmla.flash_mla_with_kvcache(
        **dict(base, tile_scheduler_metadata=md, num_splits=ns)
    )
    ref_out, ref_lse = flashmla.flash_mla_with_kvcache(**base)
    assert torch.equal(out, ref_out)
    assert torch.equal(lse, ref_lse)


# --------------------------------------------------------------------------------------------
# The exception hierarchy


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (InvalidArgumentError, ValueError),
        (DTypeError, TypeError),
        (DTypeError, ValueError),
        (ShapeError, ValueError),
        (LayoutError, ValueError),
        (DeviceError, ValueError),
        (SchedMetaMismatchError, AssertionError),
        (SchedMetaMismatchError, ValueError),
        (UnknownBackendError, ValueError),
        (NoBackendError, NotImplementedError),
    ],
    ids=lambda x: x.__name__,
)
def test_error_builtin_bases(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin)
    assert issubclass(cls, FlashMLAError)


@pytest.mark.parametrize(
    "cls", [DTypeError, ShapeError, LayoutError, DeviceError, SchedMetaMismatchError]
)
def test_argument_errors_are_invalid_argument_errors(cls: type) -> None:
    assert issubclass(cls, InvalidArgumentError)
    err = cls("x", "must be y", 3)
    assert (err.argument, err.rule, err.got) == ("x", "must be y", 3)
    assert str(err) == "x: must be y (got 3)"
    assert str(cls("x", "must be y")) == "x: must be y"


def test_public_names_export_the_errors() -> None:
    for name in (
        "DTypeError", "ShapeError", "LayoutError", "DeviceError", "InvalidArgumentError",
        "SchedMetaMismatchError", "UnknownBackendError", "NoBackendError", "FlashMLAError",
    ):  # fmt: skip
        assert getattr(flashmla, name) is getattr(flashmla.errors, name)


def test_dtype_error_caught_as_type_error() -> None:
    inputs = dict(_prefill(), q=_prefill()["q"].float())
    with pytest.raises(TypeError):
        flashmla.flash_mla_sparse_fwd(**inputs)


def test_validation_runs_before_any_backend() -> None:
    """Bad inputs fail the same way when the only backend forced cannot run anything."""
    spec = flashmla.BackendSpec("nothing", "0", "flashmla_no_such_module", ops={})
    flashmla.register_backend(spec)
    try:
        with flashmla.use_backend("nothing"):
            with pytest.raises(ShapeError):
                flashmla.flash_mla_sparse_fwd(**dict(_prefill(), q=_prefill()["q"][None]))
            with pytest.raises(NoBackendError):
                flashmla.flash_mla_sparse_fwd(**_prefill())
    finally:
        flashmla.registry.REGISTRY.unregister("nothing")
