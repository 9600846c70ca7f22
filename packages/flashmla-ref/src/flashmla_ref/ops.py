"""Reference implementations of every flashmla op (fp32 math, exact contract semantics).

Inputs arrive validated (:mod:`flashmla.problems`). ``out_dtype=torch.float32`` keeps the fp32
result unrounded (what parity tests compare against). Work is chunked so that the benchmark shapes
of ``spec/performance.md`` fit in GPU memory; no op reads tensor values on the host except the
cache write (which uses boolean masking)."""

from __future__ import annotations

import torch
from torch import Tensor

from flashmla.formats import read_tokens, write_tokens
from flashmla.problems import (
    CacheWriteProblem,
    DenseDecodeProblem,
    SparseDecodeProblem,
    SparsePrefillProblem,
)

from .attention import apply_sink, chunks, masked_attention
from .mha import mha_backward, mha_forward

__all__ = [
    "cache_write",
    "dense_decode",
    "mha_backward",
    "mha_forward",
    "sparse_decode",
    "sparse_prefill",
]


def dense_decode(
    p: DenseDecodeProblem, plan: object = None, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    q, cache, table = p.q, p.k_cache, p.block_table
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, _ = cache.shape
    group = h_q // h_kv
    n_keys = table.shape[1] * page
    lengths = p.cache_seqlens.long().clamp(0, n_keys)
    out, lse = p.empty_outputs(out_dtype)
    positions = torch.arange(n_keys, device=q.device)
    # Query t of s_q sees keys j <= L - s_q + t when causal (bottom-right aligned).
    last_visible = lengths[:, None] - s_q + torch.arange(s_q, device=q.device)  # [b, s_q]
    for c in chunks(b, n_keys * h_kv * (d + s_q * group)):
        pages = table[c].long()
        page_ok = (pages >= 0) & (pages < num_blocks)
        slots = (
            torch.where(page_ok, pages, 0)[:, :, None] * page + torch.arange(page, device=q.device)
        ).flatten(1)
        token_ok = page_ok.repeat_interleave(page, dim=1) & (positions < lengths[c, None])  # [c, N]
        keys = read_tokens(cache, slots, p.cache_format).float()  # [c, N, h_kv, d]
        keys = keys.masked_fill(~token_ok[:, :, None, None], 0.0).transpose(1, 2)  # [c, h_kv, N, d]
        sees = token_ok[:, None, :]  # [c, 1 (s_q), N]
        if p.causal:
            sees = sees & (positions <= last_visible[c, :, None])  # [c, s_q, N]
        sees = sees[:, None, :, None, :].expand(-1, h_kv, s_q, group, -1)
        rows = q[c].float().view(-1, s_q, h_kv, group, d).permute(0, 2, 1, 3, 4)  # [c,h_kv,s_q,g,d]
        keys = keys.reshape(-1, n_keys, d)
        o, l, _ = masked_attention(
            rows.reshape(-1, s_q * group, d), keys, keys[..., :512],
            sees.reshape(-1, s_q * group, n_keys), p.softmax_scale,
        )  # fmt: skip
        n = pages.shape[0]
        out[c] = (
            o.view(n, h_kv, s_q, group, 512)
            .permute(0, 2, 1, 3, 4)
            .reshape(n, s_q, h_q, 512)
            .to(out.dtype)
        )
        lse[c] = l.view(n, h_kv, s_q, group).permute(0, 1, 3, 2).reshape(n, h_q, s_q)
    return out, lse


def _gather_candidates(
    cache: Tensor, indices: Tensor, length: Tensor | None, fmt
) -> tuple[Tensor, Tensor]:
    """Keys ``[..., topk, d]`` (invalid ones zeroed) and validity ``[..., topk]`` of flat slots."""
    capacity = cache.shape[0] * cache.shape[1]
    idx = indices.long()
    valid = (idx >= 0) & (idx < capacity)
    if length is not None:
        position = torch.arange(idx.shape[-1], device=idx.device)
        valid = valid & (position < length.long().view(-1, *[1] * (idx.dim() - 1)))
    keys = read_tokens(cache, torch.where(valid, idx, 0), fmt)[..., 0, :].float()
    return keys.masked_fill(~valid.unsqueeze(-1), 0.0), valid


def sparse_decode(
    p: SparseDecodeProblem, plan: object = None, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    q = p.q
    b, s_q, h_q, d = q.shape
    n_keys = p.indices.shape[2] + (0 if p.extra_indices is None else p.extra_indices.shape[2])
    out, lse = p.empty_outputs(out_dtype)
    for c in chunks(b, s_q * n_keys * (d + h_q)):
        keys, valid = _gather_candidates(
            p.k_cache,
            p.indices[c],
            None if p.topk_length is None else p.topk_length[c],
            p.cache_format,
        )
        if p.extra_k_cache is not None:
            length = None if p.extra_topk_length is None else p.extra_topk_length[c]
            k2, v2 = _gather_candidates(p.extra_k_cache, p.extra_indices[c], length, p.cache_format)
            keys, valid = torch.cat([keys, k2], dim=2), torch.cat([valid, v2], dim=2)
        n = keys.shape[0]
        keys = keys.view(n * s_q, n_keys, d)
        o, l, _ = masked_attention(
            q[c].reshape(n * s_q, h_q, d), keys, keys[..., :512],
            valid.view(n * s_q, 1, n_keys), p.softmax_scale,
        )  # fmt: skip
        o = apply_sink(o, l, p.attn_sink)
        out[c] = o.view(n, s_q, h_q, 512).to(out.dtype)
        lse[c] = l.view(n, s_q, h_q).transpose(1, 2)
    return out, lse


def sparse_prefill(
    p: SparsePrefillProblem, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    q = p.q
    s_q, h_q, d = q.shape
    topk = p.indices.shape[2]
    s_kv = p.kv.shape[0]
    out, max_logits, lse = p.empty_outputs(out_dtype)
    position = torch.arange(topk, device=q.device)
    for c in chunks(s_q, topk * (d + h_q)):
        idx = p.indices[c, 0, :].long()
        valid = (idx >= 0) & (idx < s_kv)
        if p.topk_length is not None:
            valid = valid & (position < p.topk_length[c, None].long())
        keys = p.kv[torch.where(valid, idx, 0), 0, :].float().masked_fill(~valid.unsqueeze(-1), 0.0)
        o, l, m = masked_attention(q[c], keys, keys[..., : p.d_v], valid.unsqueeze(1), p.sm_scale)
        out[c] = apply_sink(o, l, p.attn_sink).to(out.dtype)
        max_logits[c], lse[c] = m, l
    return out, max_logits, lse


def cache_write(p: CacheWriteProblem) -> None:
    slots = p.slot_mapping.long()
    capacity = p.kv_cache.shape[0] * p.kv_cache.shape[1]
    keep = (slots >= 0) & (slots < capacity)
    write_tokens(p.kv_cache, slots[keep], p.new_kv[keep], p.cache_format)
