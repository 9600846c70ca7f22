"""Reference dense MHA prefill (varlen, causal bottom-right, GQA) forward and backward in fp32.

Sequences are padded to ``max_seqlen_*`` inside a chunk of (sequence, KV head) pairs, so no
value is read on the host; results are scattered back through an extra dummy row that absorbs
the padding. ``max_seqlen_*`` must be at least every sequence's length (as in FlashMLA)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flashmla.problems import MhaProblem

from .attention import chunks, masked_attention


@dataclass
class _Chunk:
    """Padded views of ``c`` sequences x ``hc`` KV heads; a row is one (sequence, KV head) pair
    holding ``Mq * group`` queries (query-major) and ``Mk`` keys."""

    q_rows: Tensor  # [c, Mq] row index into q; padding points at the dummy row total_q
    k_rows: Tensor  # [c, Mk]
    kv_heads: Tensor  # [hc]
    q_heads: Tensor  # [hc * group] the query heads of those KV heads
    group: int
    q: Tensor  # [c*hc, Mq*g, d]
    k: Tensor  # [c*hc, Mk, d]
    v: Tensor  # [c*hc, Mk, dv]
    mask: Tensor  # [c*hc, Mq*g, Mk]

    def query_rows(self, t: Tensor) -> Tensor:
        """Per-query values ``t [total_q + 1, h_q, ...]`` in this chunk's row layout."""
        c, mq = self.q_rows.shape
        hc = self.kv_heads.numel()
        x = t[self.q_rows][:, :, self.q_heads].reshape(c, mq, hc, self.group, *t.shape[2:])
        return x.transpose(1, 2).reshape(c * hc, mq * self.group, *t.shape[2:])

    def scatter_queries(self, buf: Tensor, values: Tensor) -> None:
        """Inverse of :meth:`query_rows`: write ``values`` into ``buf [total_q + 1, h_q, ...]``."""
        c, mq = self.q_rows.shape
        hc = self.kv_heads.numel()
        vals = values.reshape(c, hc, mq, self.group, *values.shape[2:]).transpose(1, 2)
        rows = self.q_rows[:, :, None].expand(c, mq, hc * self.group)
        buf[rows, self.q_heads.expand(c, mq, -1)] = vals.reshape(
            c, mq, hc * self.group, *values.shape[2:]
        )

    def add_keys(self, buf: Tensor, values: Tensor) -> None:
        """Accumulate per-key ``values [c*hc, Mk, dim]`` into ``buf [total_k + 1, h_kv, dim]``."""
        c, mk = self.k_rows.shape
        hc = self.kv_heads.numel()
        vals = values.reshape(c, hc, mk, -1).transpose(1, 2)
        rows = self.k_rows[:, :, None].expand(c, mk, hc)
        buf.index_put_((rows, self.kv_heads.expand(c, mk, hc)), vals, accumulate=True)


def _padded_rows(cu: Tensor, seqs: slice, max_len: int, total: int) -> tuple[Tensor, Tensor]:
    start = cu[seqs].long()
    length = cu[seqs.start + 1 : seqs.stop + 1].long() - start
    pos = torch.arange(max_len, device=cu.device)
    valid = pos < length[:, None]
    return torch.where(valid, start[:, None] + pos, total), valid


def _gather(t: Tensor, rows: Tensor, heads: Tensor) -> Tensor:
    """``t[rows][:, :, heads]`` as fp32, the dummy row reading zeros: ``[c, M, len(heads), d]``."""
    zero = t.new_zeros(1, heads.numel(), t.shape[2], dtype=torch.float32)
    return torch.cat([t[:, heads].float(), zero])[rows]


def _chunks(p: MhaProblem) -> Iterator[_Chunk]:
    total_q, h_q, d = p.q.shape
    total_k, h_kv, _ = p.k.shape
    group = h_q // h_kv
    mq, mk = max(p.max_seqlen_q, 1), max(p.max_seqlen_k, 1)
    dev = p.q.device
    per_pair = group * mq * mk * 3 + (mq * group + mk) * (d + p.v.shape[2])
    for seqs in chunks(p.batch, h_kv * per_pair):
        q_rows, q_ok = _padded_rows(p.cu_seqlens_q, seqs, mq, total_q)
        k_rows, k_ok = _padded_rows(p.cu_seqlens_k, seqs, mk, total_k)
        c = q_rows.shape[0]
        sees = q_ok[:, :, None] & k_ok[:, None, :]  # [c, Mq, Mk]
        if p.causal:  # bottom-right: query i sees key j <= i + (L_k - L_q)
            shift = (k_ok.sum(1) - q_ok.sum(1))[:, None, None]
            sees = sees & (
                torch.arange(mk, device=dev) <= torch.arange(mq, device=dev)[:, None] + shift
            )
        for heads in chunks(h_kv, per_pair * c):
            kv_heads = torch.arange(heads.start, heads.stop, device=dev)
            hc = kv_heads.numel()
            q_heads = (kv_heads[:, None] * group + torch.arange(group, device=dev)).flatten()
            q = _gather(p.q, q_rows, q_heads).view(c, mq, hc, group, d).transpose(1, 2)
            mask = sees[:, None, :, None, :].expand(c, hc, mq, group, mk)
            yield _Chunk(
                q_rows, k_rows, kv_heads, q_heads, group,
                q.reshape(c * hc, mq * group, d),
                _gather(p.k, k_rows, kv_heads).transpose(1, 2).reshape(c * hc, mk, d),
                _gather(p.v, k_rows, kv_heads).transpose(1, 2).reshape(c * hc, mk, -1),
                mask.reshape(c * hc, mq * group, mk),
            )  # fmt: skip


def mha_forward(p: MhaProblem, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    total_q, h_q, _ = p.q.shape
    out, lse = p.empty_outputs(out_dtype)
    out_buf = torch.zeros(total_q + 1, h_q, p.v.shape[2], device=p.q.device)
    lse_buf = torch.full((total_q + 1, h_q), math.inf, device=p.q.device)
    for ch in _chunks(p):
        o, l, _ = masked_attention(ch.q, ch.k, ch.v, ch.mask, p.softmax_scale)
        ch.scatter_queries(out_buf, o)
        ch.scatter_queries(lse_buf, l)
    out.copy_(out_buf[:total_q])
    lse.copy_(lse_buf[:total_q])
    return out, lse


def mha_backward(
    p: MhaProblem, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v (including ``lse``'s, when ``dlse`` is given: d lse / d s = P)."""
    total_q, h_q, _ = p.q.shape
    total_k, h_kv, _ = p.k.shape
    dev = p.q.device
    delta = (dout.float() * out.float()).sum(-1)  # D = rowsum(dO * O)
    if dlse is not None:
        delta = delta - dlse.float()
    pad = torch.zeros(1, h_q, device=dev)
    delta = torch.cat([delta, pad])
    lse_pad = torch.cat([lse.float(), pad + math.inf])
    dout_pad = torch.cat([dout.float(), torch.zeros(1, h_q, dout.shape[2], device=dev)])
    dq = torch.zeros(total_q + 1, h_q, p.q.shape[2], device=dev)
    dk = torch.zeros(total_k + 1, h_kv, p.k.shape[2], device=dev)
    dv = torch.zeros(total_k + 1, h_kv, p.v.shape[2], device=dev)
    for ch in _chunks(p):
        scores = torch.einsum("rhd,rnd->rhn", ch.q, ch.k) * p.softmax_scale
        scores = scores.masked_fill(~ch.mask, -math.inf)
        prob = torch.exp(scores - ch.query_rows(lse_pad).unsqueeze(-1)).nan_to_num(nan=0.0)
        d_o = ch.query_rows(dout_pad)
        ch.add_keys(dv, torch.einsum("rhn,rhd->rnd", prob, d_o))
        dp = torch.einsum("rhd,rnd->rhn", d_o, ch.v)
        ds = prob * (dp - ch.query_rows(delta).unsqueeze(-1))
        ch.scatter_queries(dq, torch.einsum("rhn,rnd->rhd", ds, ch.k) * p.softmax_scale)
        ch.add_keys(dk, torch.einsum("rhn,rhd->rnd", ds, ch.q) * p.softmax_scale)
    dtype = out_dtype or p.q.dtype
    return dq[:total_q].to(dtype), dk[:total_k].to(dtype), dv[:total_k].to(dtype)
