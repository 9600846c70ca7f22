"""A brute-force float64 oracle for every flashmla op, written from the contract (spec §1-§5).

Nothing here imports flashmla: FP8 records are decoded from raw bytes with a hand-written e4m3
bit decoder, paged caches are walked token by token, and attention is computed one
(request, query row, head) at a time with float64 dot products. It is slow and meant for small
shapes; its only virtue is being obviously right.

Every function takes the keyword arguments of the public function it mirrors (what
``flashmla.testing``'s generators return) and returns float64 tensors with the public shapes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Number formats, bit by bit


def e4m3_value(byte: int) -> float:
    """float8_e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities,
    exponent 15 with mantissa 7 is NaN; exponent 0 is subnormal (m/8 * 2^-6)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8.0) * 2.0**-6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


E4M3_TABLE = np.array([e4m3_value(b) for b in range(256)], dtype=np.float64)


def ue8m0_value(byte: int) -> float:
    """float8_e8m0fnu: an unsigned power of two 2^(e - 127); 0xFF is NaN."""
    return math.nan if byte == 0xFF else 2.0 ** (int(byte) - 127)


def bf16_from_bytes(raw: np.ndarray) -> np.ndarray:
    """Little-endian bf16 values (2 bytes each) -> float64: the bits are the top half of a float32."""
    halves = raw[0::2].astype(np.uint32) | (raw[1::2].astype(np.uint32) << 8)
    return (halves << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def f32_from_bytes(raw: np.ndarray) -> np.ndarray:
    """Little-endian float32 values (4 bytes each) -> float64."""
    return np.ascontiguousarray(raw).view("<f4").astype(np.float64)


def round_to_bf16(x: np.ndarray | float) -> np.ndarray:
    """Round-to-nearest-even to bf16 (values stay float64)."""
    return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).double().numpy()


# --------------------------------------------------------------------------------------------
# Paged caches: a token's values, read from the cache tensor's bytes


class CacheReader:
    """Reads token ``row`` of page ``block`` (KV head ``head``) of a paged cache as float64.

    Plain caches (``[num_blocks, B, h_kv, d]`` bf16/fp16) are indexed directly. FP8 caches
    (1-byte dtype, last dim 656 = V3.2 or 584 = MODEL1) are decoded from the bytes of their
    storage: page ``p`` starts at byte ``storage_offset + p * stride(0)``."""

    def __init__(self, cache: Tensor):
        self.num_blocks, self.page, self.h_kv, self.width = cache.shape
        self.fp8 = cache.element_size() == 1
        if not self.fp8:
            self.values = cache.double().numpy()
            self.layout = "plain"
            return
        assert cache.stride(-1) == 1 and cache.stride(1) == self.width, "FP8 pages must be packed"
        self.layout = {656: "v32", 584: "model1"}[self.width]
        storage = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
        self.bytes = storage.numpy()
        self.base = cache.storage_offset()
        self.page_stride = cache.stride(0)

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.page

    def page_bytes(self, block: int) -> np.ndarray:
        start = self.base + block * self.page_stride
        return self.bytes[start : start + self.page * (656 if self.layout == "v32" else 584)]

    def token(self, block: int, row: int, head: int = 0) -> np.ndarray:
        assert 0 <= block < self.num_blocks and 0 <= row < self.page
        if self.layout == "plain":
            return self.values[block, row, head]
        assert head == 0
        page = self.page_bytes(block)
        if self.layout == "v32":
            rec = page[row * 656 : (row + 1) * 656]
            codes = E4M3_TABLE[rec[:512]]
            scales = round_to_bf16(f32_from_bytes(rec[512:528]))  # one per 128 NoPE dims
            nope = round_to_bf16(codes * np.repeat(scales, 128))
            rope = bf16_from_bytes(rec[528:656])
            return np.concatenate([nope, rope])
        rec = page[row * 576 : (row + 1) * 576]
        scale_rec = page[self.page * 576 + row * 8 : self.page * 576 + row * 8 + 7]
        scales = np.array([ue8m0_value(int(e)) for e in scale_rec])  # one per 64 NoPE dims
        nope = round_to_bf16(E4M3_TABLE[rec[:448]] * np.repeat(scales, 64))
        rope = bf16_from_bytes(rec[448:576])
        return np.concatenate([nope, rope])

    def slot(self, slot: int) -> np.ndarray:
        return self.token(slot // self.page, slot % self.page)


# --------------------------------------------------------------------------------------------
# One softmax-attention row


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float):
    """``(out, lse, max_logit)`` of one query ``q [d]`` over keys ``[n, d]`` and values
    ``[n, d_v]``, in float64. No key (n = 0): ``out = 0``, ``lse = +inf``, ``max_logit = -inf``."""
    if keys.shape[0] == 0:
        return np.zeros(values.shape[1]), math.inf, -math.inf
    logits = scale * (keys @ q)
    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m).sum()))
    weights = np.exp(logits - lse)
    return weights @ values, lse, m


def _stack(rows: list[np.ndarray], width: int) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width))


def sink_factor(sink: float, lse: float) -> float:
    """``1 / (1 + exp(sink - lse))`` with the infinities spelled out (empty rows: lse = +inf)."""
    if lse == math.inf or sink == math.inf:
        return 0.0
    if sink == -math.inf:
        return 1.0
    x = sink - lse
    return 0.0 if x > 700 else 1.0 / (1.0 + math.exp(x))


def _f64(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _ints(t: Tensor | None) -> list | None:
    return None if t is None else t.detach().cpu().tolist()


# --------------------------------------------------------------------------------------------
# Dense decode (spec §1.3)


def dense_decode(
    q: Tensor, k_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int = 512,
    softmax_scale: float | None = None, causal: bool = False, **_unused,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    b, s_q, h_q, d = q.shape
    cache = CacheReader(k_cache)
    h_kv = cache.h_kv
    group = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qs = _f64(q)
    table = _ints(block_table)
    lengths = _ints(cache_seqlens)
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.zeros((b, h_q, s_q))
    for i in range(b):
        L = lengths[i]
        keys = [[] for _ in range(h_kv)]  # request i's keys, logical order, per KV head
        for j in range(L):
            block, row = table[i][j // cache.page], j % cache.page
            for g in range(h_kv):
                keys[g].append(cache.token(block, row, g))
        stacked = [_stack(keys[g], d) for g in range(h_kv)]
        for t in range(s_q):
            visible = L
            if causal and s_q > 1:  # bottom-right: query t sees keys j <= L - s_q + t
                visible = max(0, min(L, L - s_q + t + 1))
            for h in range(h_q):
                g = h // group
                ks = stacked[g][:visible]
                o, l, _ = attend(qs[i, t, h], ks, ks[:, :head_dim_v], scale)
                out[i, t, h], lse[i, h, t] = o, l
    return torch.from_numpy(out), torch.from_numpy(lse)


# --------------------------------------------------------------------------------------------
# Sparse decode (spec §1.4)


def _sparse_candidates(reader: CacheReader, row: list[int], length: int | None) -> list[np.ndarray]:
    n = len(row) if length is None else max(0, min(length, len(row)))
    return [reader.slot(s) for s in row[:n] if 0 <= s < reader.capacity]


def sparse_decode(
    q: Tensor, k_cache: Tensor, indices: Tensor, head_dim_v: int = 512,
    softmax_scale: float | None = None, attn_sink: Tensor | None = None,
    extra_k_cache: Tensor | None = None, extra_indices_in_kvcache: Tensor | None = None,
    topk_length: Tensor | None = None, extra_topk_length: Tensor | None = None, **_unused,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    b, s_q, h_q, d = q.shape
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qs = _f64(q)
    main = CacheReader(k_cache)
    extra = None if extra_k_cache is None else CacheReader(extra_k_cache)
    idx, extra_idx = _ints(indices), _ints(extra_indices_in_kvcache)
    lengths, extra_lengths = _ints(topk_length), _ints(extra_topk_length)
    sinks = None if attn_sink is None else _ints(attn_sink)
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.zeros((b, h_q, s_q))
    for i in range(b):
        for t in range(s_q):
            keys = _sparse_candidates(main, idx[i][t], None if lengths is None else lengths[i])
            if extra is not None:
                n = None if extra_lengths is None else extra_lengths[i]
                keys += _sparse_candidates(extra, extra_idx[i][t], n)
            keys = _stack(keys, d)
            for h in range(h_q):
                o, l, _ = attend(qs[i, t, h], keys, keys[:, :head_dim_v], scale)
                if sinks is not None:
                    o = o * sink_factor(sinks[h], l)
                out[i, t, h], lse[i, h, t] = o, l
    return torch.from_numpy(out), torch.from_numpy(lse)


# --------------------------------------------------------------------------------------------
# Sparse prefill (spec §2)


def sparse_prefill(
    q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int = 512,
    attn_sink: Tensor | None = None, topk_length: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    s_q, h_q, _ = q.shape
    s_kv = kv.shape[0]
    qs, kvs = _f64(q), _f64(kv)
    idx, lengths = _ints(indices), _ints(topk_length)
    sinks = None if attn_sink is None else _ints(attn_sink)
    out = np.zeros((s_q, h_q, d_v))
    max_logits = np.zeros((s_q, h_q))
    lse = np.zeros((s_q, h_q))
    for t in range(s_q):
        row = idx[t][0]
        n = len(row) if lengths is None else max(0, min(lengths[t], len(row)))
        keys = _stack([kvs[j, 0] for j in row[:n] if 0 <= j < s_kv], kvs.shape[2])
        for h in range(h_q):
            o, l, m = attend(qs[t, h], keys, keys[:, :d_v], sm_scale)
            if sinks is not None:
                o = o * sink_factor(sinks[h], l)
            out[t, h], max_logits[t, h], lse[t, h] = o, m, l
    return torch.from_numpy(out), torch.from_numpy(max_logits), torch.from_numpy(lse)


# --------------------------------------------------------------------------------------------
# Dense MHA prefill (spec §3): forward, and backward as explicit per-row formulas


def _mha_visible(i: int, len_q: int, len_k: int, causal: bool) -> int:
    """How many keys query ``i`` of a sequence sees (bottom-right causal: j <= i + L_k - L_q)."""
    return max(0, min(len_k, i + len_k - len_q + 1)) if causal else len_k


def mha_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_qo: Tensor, cu_seqlens_kv: Tensor,
    softmax_scale: float | None = None, causal: bool = False, **_unused,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    total_q, h_q, d = q.shape
    h_kv, d_v = k.shape[1], v.shape[2]
    group = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qs, ks, vs = _f64(q), _f64(k), _f64(v)
    cu_q, cu_k = _ints(cu_seqlens_qo), _ints(cu_seqlens_kv)
    out = np.zeros((total_q, h_q, d_v))
    lse = np.zeros((total_q, h_q))
    for s in range(len(cu_q) - 1):
        q0, k0 = cu_q[s], cu_k[s]
        len_q, len_k = cu_q[s + 1] - q0, cu_k[s + 1] - k0
        for i in range(len_q):
            n = _mha_visible(i, len_q, len_k, causal)
            for h in range(h_q):
                g = h // group
                keys = _stack([ks[k0 + j, g] for j in range(n)], d)
                vals = _stack([vs[k0 + j, g] for j in range(n)], d_v)
                o, l, _ = attend(qs[q0 + i, h], keys, vals, scale)
                out[q0 + i, h], lse[q0 + i, h] = o, l
    return torch.from_numpy(out), torch.from_numpy(lse)


def mha_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_qo: Tensor, cu_seqlens_kv: Tensor,
    softmax_scale: float | None = None, causal: bool = False, dlse: Tensor | None = None,
    out_for_delta: Tensor | None = None, **_unused,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of ``sum(out * dout) + sum(lse * dlse)`` with respect to q, k, v, in float64.

    Per query row i and visible key j: ``P_ij = exp(s_ij - lse_i)``, ``dV_j += P_ij dO_i``,
    ``dP_ij = dO_i . v_j``, ``dS_ij = P_ij (dP_ij - D_i + dlse_i)`` with ``D_i = dO_i . O_i``,
    ``dQ_i += scale dS_ij k_j`` and ``dK_j += scale dS_ij q_i``. ``O`` is the exact float64
    output unless ``out_for_delta`` gives the one a kernel stored (FlashAttention's convention:
    ``D`` is computed from the saved, rounded output)."""
    total_q, h_q, d = q.shape
    total_k, h_kv, d_v = v.shape
    group = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    qs, ks, vs, dos = _f64(q), _f64(k), _f64(v), _f64(dout)
    dls = None if dlse is None else _f64(dlse)
    out, lse = mha_forward(q, k, v, cu_seqlens_qo, cu_seqlens_kv, softmax_scale, causal)
    outs = out.numpy() if out_for_delta is None else _f64(out_for_delta)
    lse = lse.numpy()
    cu_q, cu_k = _ints(cu_seqlens_qo), _ints(cu_seqlens_kv)
    dq, dk, dv = (
        np.zeros((total_q, h_q, d)),
        np.zeros((total_k, h_kv, d)),
        np.zeros((total_k, h_kv, d_v)),
    )
    for s in range(len(cu_q) - 1):
        q0, k0 = cu_q[s], cu_k[s]
        len_q, len_k = cu_q[s + 1] - q0, cu_k[s + 1] - k0
        for i in range(len_q):
            n = _mha_visible(i, len_q, len_k, causal)
            for h in range(h_q):
                g, r = h // group, q0 + i
                delta = float(np.dot(dos[r, h], outs[r, h]))
                extra = 0.0 if dls is None else float(dls[r, h])
                for j in range(n):
                    key = k0 + j
                    p = math.exp(scale * float(np.dot(qs[r, h], ks[key, g])) - lse[r, h])
                    dv[key, g] += p * dos[r, h]
                    ds = p * (float(np.dot(dos[r, h], vs[key, g])) - delta + extra)
                    dq[r, h] += scale * ds * ks[key, g]
                    dk[key, g] += scale * ds * qs[r, h]
    return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv)
