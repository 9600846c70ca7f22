"""flashmla's ops as ``torch.library`` custom ops (namespace ``flashmla``).

Eager calls skip this layer (it costs dispatcher round trips); it exists so that
``torch.compile(fullgraph=True)`` traces calls as opaque ops with fake (shape-only)
implementations, and so that compiled graphs can be CUDA-graph captured. Each op's real
implementation validates and dispatches exactly like the eager path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import execute, problems


def with_kvcache_eager(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor | None,
    cache_seqlens: Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: object,
    num_splits: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    is_fp8_kvcache: bool,
    indices: Tensor | None,
    attn_sink: Tensor | None,
    extra_k_cache: Tensor | None,
    extra_indices_in_kvcache: Tensor | None,
    topk_length: Tensor | None,
    extra_topk_length: Tensor | None,
) -> tuple[Tensor, Tensor]:
    p = _decode_problem(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
        extra_indices_in_kvcache, topk_length, extra_topk_length,
    )  # fmt: skip
    return execute.run_decode(p, tile_scheduler_metadata, causal, is_fp8_kvcache)


def _decode_problem(
    q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
    softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
    extra_indices_in_kvcache, topk_length, extra_topk_length,
) -> problems.DenseDecodeProblem | problems.SparseDecodeProblem:  # fmt: skip
    if indices is not None:
        return problems.build_sparse_decode(
            q, k_cache, indices, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale,
            causal, is_fp8_kvcache, attn_sink, extra_k_cache, extra_indices_in_kvcache,
            topk_length, extra_topk_length,
        )  # fmt: skip
    for name, value in (
        ("attn_sink", attn_sink),
        ("extra_k_cache", extra_k_cache),
        ("extra_indices_in_kvcache", extra_indices_in_kvcache),
        ("topk_length", topk_length),
        ("extra_topk_length", extra_topk_length),
    ):
        problems.need_none(name, value, "is only valid for sparse decode (pass indices)")
    return problems.build_dense_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache,
    )  # fmt: skip


@torch.library.custom_op("flashmla::with_kvcache", mutates_args=())
def with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor | None,
    cache_seqlens: Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: Tensor | None,
    num_splits: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
    is_fp8_kvcache: bool,
    indices: Tensor | None,
    attn_sink: Tensor | None,
    extra_k_cache: Tensor | None,
    extra_indices_in_kvcache: Tensor | None,
    topk_length: Tensor | None,
    extra_topk_length: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return with_kvcache_eager(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
        extra_indices_in_kvcache, topk_length, extra_topk_length,
    )  # fmt: skip


@with_kvcache.register_fake
def _(*args) -> tuple[Tensor, Tensor]:
    return _decode_problem(*args).empty_outputs()


@torch.library.custom_op("flashmla::sparse_prefill", mutates_args=())
def sparse_prefill(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int,
    attn_sink: Tensor | None,
    topk_length: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    p = problems.build_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    return execute.run_sparse_prefill(p)


@sparse_prefill.register_fake
def _(*args) -> tuple[Tensor, Tensor, Tensor]:
    return problems.build_sparse_prefill(*args).empty_outputs()


@torch.library.custom_op("flashmla::mha_forward", mutates_args=())
def mha_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    p = problems.build_mha(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal
    )
    return execute.run_mha_forward(p)


@mha_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal) -> tuple[Tensor, Tensor]:
    return problems.build_mha(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal).empty_outputs()


@torch.library.custom_op("flashmla::mha_backward", mutates_args=())
def mha_backward(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    p = problems.build_mha(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale,
        causal, backward=True,
    )  # fmt: skip
    return execute.run_mha_backward(p, out, lse, dout, dlse)


@mha_backward.register_fake
def _(dout, dlse, q, k, v, *rest) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _mha_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)


def _mha_backward_rule(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = mha_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(
    "flashmla::mha_forward", _mha_backward_rule, setup_context=_mha_setup_context
)


@torch.library.custom_op("flashmla::cache_write", mutates_args=("kv_cache",))
def cache_write(kv_cache: Tensor, new_kv: Tensor, slot_mapping: Tensor, is_fp8: bool) -> None:
    execute.run_cache_write(problems.build_cache_write(kv_cache, new_kv, slot_mapping, is_fp8))


@cache_write.register_fake
def _(kv_cache, new_kv, slot_mapping, is_fp8) -> None:
    problems.build_cache_write(kv_cache, new_kv, slot_mapping, is_fp8)
