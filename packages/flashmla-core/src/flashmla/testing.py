"""Inputs and comparisons shared by every test suite and by ``flashmla bench``.

The generators follow FlashMLA's own tests (contract §8): random page order, NaN-poisoned unused
pages and rows past each sequence's end, out-of-range table entries where nothing may be read,
optional non-contiguous layouts. Each returns the keyword arguments of the public function it
feeds, so ``flashmla.flash_mla_with_kvcache(**inputs)`` runs the case.

:func:`assert_close` is FlashMLA's comparator (``kernelkit.check_is_allclose``): special values
at the same positions, then per-element abs-or-rel tolerance, then a global cosine bound.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .formats import CacheFormat
from .paged import allocate_paged_cache, write_kv_cache

UNUSED_PAGE_ID = 2147480000  # what FlashMLA's tests put in unused block-table entries
INVALID_INDEX_VALUES = (-(2**31), -123456, -1, 114514, 1919810, 2147480000, 2**31 - 1)

# (abs_tol, rel_tol, cos_diff_tol) per op and output, from FlashMLA's tests (§8.1).
TOLERANCES: dict[str, dict[str, tuple[float, float, float]]] = {
    "dense_decode": {"out": (8e-4, 2.01 / 128, 5e-6), "lse": (1e-6, 8.01 / 65536, 1e-7)},
    "sparse_decode": {"out": (1e-3, 2.01 / 128, 5e-6), "lse": (1e-6, 8.01 / 65536, 1e-7)},
    "sparse_prefill": {
        "out": (8e-4, 3.01 / 128, 7e-6),
        "max_logits": (1e-6, 2.01 / 65536, 1e-7),
        "lse": (1e-6, 2.01 / 65536, 1e-7),
    },
    "mha": {"out": (1e-3, 8.01 / 128, 7e-6), "grad": (1e-3, 8.01 / 128, 7e-6), "lse": (1e-6, 2.01 / 65536, 1e-7)},
}


# --------------------------------------------------------------------------------------------
# Comparison


def compare(ans: Tensor, ref: Tensor, abs_tol: float, rel_tol: float, cos_diff_tol: float) -> list[str]:
    """Everything wrong with ``ans`` against ``ref`` (an empty list means they match)."""
    problems = []
    if ans.shape != ref.shape:
        return [f"shape {tuple(ans.shape)} != {tuple(ref.shape)}"]
    a, r = ans.double(), ref.double()
    for name, test in (("nan", torch.isnan), ("+inf", lambda x: x == math.inf), ("-inf", lambda x: x == -math.inf)):
        mismatch = test(a) != test(r)
        if mismatch.any():
            where = mismatch.nonzero()[0].tolist()
            problems.append(
                f"{int(mismatch.sum())} positions differ in {name} (first at {where}: "
                f"got {a[tuple(where)].item()}, want {r[tuple(where)].item()})"
            )
    special = ~torch.isfinite(a) | ~torch.isfinite(r)
    a, r = a.masked_fill(special, 0.0), r.masked_fill(special, 0.0)
    err = (a - r).abs()
    bad = (err >= abs_tol) & (err / (r.abs() + 1e-6) >= rel_tol)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        problems.append(
            f"{int(bad.sum())}/{bad.numel()} elements beyond abs {abs_tol:g} and rel {rel_tol:g} "
            f"(max abs err {err.max().item():.3g}; first at {where}: got {a[tuple(where)].item()}, "
            f"want {r[tuple(where)].item()})"
        )
    denom = (a * a + r * r).sum().item()
    if denom > 1e-12:
        cos_diff = 1 - 2 * (a * r).sum().item() / denom
        if cos_diff > cos_diff_tol:
            problems.append(f"cosine difference {cos_diff:.3g} > {cos_diff_tol:g}")
    return problems


def assert_close(name: str, ans: Tensor, ref: Tensor, tolerance: tuple[float, float, float]) -> None:
    problems = compare(ans, ref, *tolerance)
    if problems:
        raise AssertionError(f"{name} mismatch:\n  " + "\n  ".join(problems))


def max_error(ans: Tensor, ref: Tensor) -> float:
    """Largest absolute difference over positions where both are finite (bench's error column)."""
    a, r = ans.double(), ref.double()
    finite = torch.isfinite(a) & torch.isfinite(r)
    if not finite.any():
        return 0.0
    return (a - r).abs()[finite].max().item()


# --------------------------------------------------------------------------------------------
# Layout helpers


def non_contiguous(t: Tensor, *, keep_inner: int = 1) -> Tensor:
    """The same values inside a larger buffer: every outer dim padded by one, the last dim by 128
    (as FlashMLA's ``non_contiguousify``); the innermost ``keep_inner`` dims stay packed (use 3
    for FP8 caches, whose pages must be contiguous). The padding is poison: NaN for floats,
    0xFF bytes for 1-byte types, the largest value for integers."""
    outer = t.dim() - keep_inner
    shape = [n + 1 for n in t.shape[:outer]] + list(t.shape[outer:])
    if keep_inner == 1:
        shape[-1] += 128
    buf = torch.empty(shape, dtype=t.dtype, device=t.device)
    if t.element_size() == 1:
        buf.view(torch.uint8).fill_(0xFF)
    elif t.dtype.is_floating_point:
        buf.fill_(math.nan)
    else:
        buf.fill_(torch.iinfo(t.dtype).max)
    view = buf[tuple(slice(0, n) for n in t.shape)]
    view.copy_(t)
    return view


def _lengths(b: int, s_k: int, s_q: int, varlen: bool, zero_frac: float, g: torch.Generator) -> Tensor:
    if varlen:
        lens = torch.normal(float(s_k), s_k / 2, (b,), generator=g).round().clamp(min=s_q)
    else:
        lens = torch.full((b,), float(s_k))
    if zero_frac > 0:
        lens = torch.where(torch.rand(b, generator=g) < zero_frac, 0.0, lens)
    return lens.to(torch.int32)


# --------------------------------------------------------------------------------------------
# Dense decode


def dense_decode_inputs(
    b: int,
    s_q: int,
    h_q: int,
    s_k: int,
    *,
    h_kv: int = 1,
    page_block_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    cache_format: CacheFormat | str | None = None,
    varlen: bool = False,
    causal: bool = False,
    zero_frac: float = 0.0,
    seqlens: Tensor | None = None,
    poison: bool = True,
    contiguous: bool = True,
    softmax_scale: float | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`flashmla.flash_mla_with_kvcache` for a dense decode case."""
    g = torch.Generator().manual_seed(seed)
    fmt = CacheFormat(cache_format or ("bf16" if dtype == torch.bfloat16 else "fp16"))
    d = fmt.head_dim or 576
    lengths = seqlens.to(torch.int32).cpu() if seqlens is not None else _lengths(b, s_k, s_q, varlen, zero_frac, g)
    blocks = [math.ceil(n / page_block_size) for n in lengths.tolist()]
    width = max(max(blocks), 1) + (1 if poison else 0)  # one spare column of unused entries
    num_blocks = max(sum(blocks), 1) + (2 if poison else 0)  # spare pages nobody owns
    order = torch.randperm(num_blocks, generator=g)
    table = torch.full((b, width), UNUSED_PAGE_ID if poison else 0, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        table[i, :n] = order[start : start + n].to(torch.int32)
        start += n
    values = (torch.randn(num_blocks, page_block_size, h_kv, d, generator=g) / 10).clamp(-1, 1)
    live = torch.zeros(num_blocks, page_block_size, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        live[table[i, pos // page_block_size].long(), pos % page_block_size] = True
    if fmt.is_fp8:
        cache = allocate_paged_cache(num_blocks, page_block_size, cache_format=fmt)
        slots = torch.arange(num_blocks * page_block_size)
        write_kv_cache(cache, values.view(-1, 1, d).to(torch.bfloat16), slots, is_fp8=True)
        if poison:
            _poison_fp8_tokens(cache, fmt, ~live.flatten())
    else:
        cache = values.to(dtype)
        if poison:
            cache[~live] = math.nan
    q = (torch.randn(b, s_q, h_q, d, generator=g) / 10).clamp(-1, 1).to(torch.bfloat16 if fmt.is_fp8 else dtype)
    device = torch.device(device)
    q, cache, table = q.to(device), cache.to(device), table.to(device)
    if not contiguous:
        q, table = non_contiguous(q), non_contiguous(table)
        cache = non_contiguous(cache, keep_inner=3 if fmt.is_fp8 else 1)
    return dict(
        q=q,
        k_cache=cache,
        block_table=table,
        cache_seqlens=lengths.to(device),
        head_dim_v=512,
        tile_scheduler_metadata=None,
        softmax_scale=softmax_scale,
        causal=causal,
        is_fp8_kvcache=fmt.is_fp8,
    )


def _poison_fp8_tokens(cache: Tensor, fmt: CacheFormat, dead: Tensor) -> None:
    """Fill every byte of the dead tokens' records with 0xFF (NaN as e4m3, float32 and bf16)."""
    page = cache.shape[1]
    slots = dead.nonzero().flatten()
    block, offset = slots // page, slots % page
    raw = cache.view(torch.uint8)
    if fmt is CacheFormat.FP8_V32:
        raw[block, offset] = 0xFF
        return
    pages = raw.view(cache.shape[0], page * 584)
    for start, width in ((offset * 576, 576), (page * 576 + offset * 8, 7)):
        idx = start[:, None] + torch.arange(width)
        pages[block[:, None], idx] = 0xFF


# --------------------------------------------------------------------------------------------
# Sparse decode


def _sparse_rows(
    b: int, s_q: int, topk: int, lengths: list[int], table: Tensor, page: int, g: torch.Generator, out_of_range: bool, capacity: int
) -> Tensor:
    """Flat-slot indices ``[b, s_q, topk]``: distinct random positions below each request's
    length, -1 padding beyond it, and (optionally) some invalid values of every kind."""
    idx = torch.full((b, s_q, topk), -1, dtype=torch.int64)
    for i in range(b):
        n = lengths[i]
        for t in range(s_q):
            take = min(n, topk)
            pos = torch.randperm(n, generator=g)[:take] if n else torch.empty(0, dtype=torch.int64)
            slots = table[i, pos // page].long() * page + pos % page
            idx[i, t, :take] = slots
    if out_of_range:
        bad = torch.rand(idx.shape, generator=g) < 0.05
        choices = torch.tensor([*INVALID_INDEX_VALUES, capacity, capacity + 7], dtype=torch.int64)
        pick = choices[torch.randint(len(choices), idx.shape, generator=g)]
        idx = torch.where(bad, pick, idx)
    return idx.to(torch.int32)


def _sparse_cache(
    fmt: CacheFormat, num_blocks: int, page: int, d: int, referenced: Tensor, g: torch.Generator, poison: bool
) -> Tensor:
    values = (torch.randn(num_blocks * page, 1, d, generator=g) / 10).clamp(-1, 1).to(torch.bfloat16)
    if fmt.is_fp8:
        cache = allocate_paged_cache(num_blocks, page, cache_format=fmt, page_align=576 if fmt is CacheFormat.FP8_MODEL1 else None)
        write_kv_cache(cache, values, torch.arange(num_blocks * page), is_fp8=True)
        if poison:
            _poison_fp8_tokens(cache, fmt, ~referenced)
        return cache
    cache = values.view(num_blocks, page, 1, d).clone()
    if poison:
        cache.view(-1, d)[~referenced] = math.nan
    return cache


def sparse_decode_inputs(
    b: int,
    s_q: int,
    h_q: int,
    topk: int,
    *,
    s_k: int | None = None,
    cache_format: CacheFormat | str = CacheFormat.FP8_V32,
    page_block_size: int = 64,
    varlen: bool = True,
    topk_length: bool = False,
    attn_sink: bool = False,
    extra_topk: int | None = None,
    extra_page_block_size: int = 64,
    extra_topk_length: bool = False,
    out_of_range: bool = True,
    zero_length_frac: float = 0.0,
    poison: bool = True,
    contiguous: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`flashmla.flash_mla_with_kvcache` for a sparse decode case."""
    g = torch.Generator().manual_seed(seed)
    fmt = CacheFormat(cache_format)
    d = fmt.head_dim or 576
    s_k = s_k or max(topk, 64)

    def cache_and_indices(k: int, page: int) -> tuple[Tensor, Tensor]:
        lengths = _lengths(b, s_k, 1, varlen, zero_length_frac, g).clamp(max=s_k).tolist()
        blocks = [max(math.ceil(n / page), 1) for n in lengths]
        num_blocks = sum(blocks) + 1
        order = torch.randperm(num_blocks, generator=g)
        table = torch.zeros(b, max(blocks), dtype=torch.int64)
        start = 0
        for i, n in enumerate(blocks):
            table[i, :n] = order[start : start + n]
            start += n
        capacity = num_blocks * page
        idx = _sparse_rows(b, s_q, k, lengths, table, page, g, out_of_range, capacity)
        ok = (idx >= 0) & (idx < capacity)
        referenced = torch.zeros(capacity, dtype=torch.bool)
        referenced[idx[ok].long()] = True
        return _sparse_cache(fmt, num_blocks, page, d, referenced, g, poison), idx

    cache, indices = cache_and_indices(topk, page_block_size)
    inputs: dict[str, Any] = dict(
        q=torch.randn(b, s_q, h_q, d, generator=g).clamp(-1, 1).to(torch.bfloat16),
        k_cache=cache,
        block_table=None,
        cache_seqlens=None,
        head_dim_v=512,
        tile_scheduler_metadata=None,
        softmax_scale=d**-0.55,
        is_fp8_kvcache=fmt.is_fp8,
        indices=indices,
    )
    if topk_length:
        inputs["topk_length"] = torch.randint(0, topk + 1, (b,), generator=g, dtype=torch.int32)
    if attn_sink:
        sink = torch.randn(h_q, generator=g)
        r = torch.rand(h_q, generator=g)
        inputs["attn_sink"] = torch.where(r < 0.31, math.inf, torch.where(r > 0.69, -math.inf, sink))
    if extra_topk is not None:
        extra_cache, extra_idx = cache_and_indices(extra_topk, extra_page_block_size)
        inputs["extra_k_cache"], inputs["extra_indices_in_kvcache"] = extra_cache, extra_idx
        if extra_topk_length:
            inputs["extra_topk_length"] = torch.randint(0, extra_topk + 1, (b,), generator=g, dtype=torch.int32)
    device = torch.device(device)
    for key, value in list(inputs.items()):
        if isinstance(value, Tensor):
            value = value.to(device)
            if not contiguous and key in ("q", "indices", "extra_indices_in_kvcache"):
                value = non_contiguous(value)
            elif not contiguous and key in ("k_cache", "extra_k_cache"):
                value = non_contiguous(value, keep_inner=3)
            inputs[key] = value
    return inputs


# --------------------------------------------------------------------------------------------
# Sparse prefill


def sparse_prefill_inputs(
    s_q: int,
    s_kv: int,
    h_q: int,
    topk: int,
    *,
    d_qk: int = 576,
    attn_sink: bool = False,
    topk_length: bool = False,
    invalid_rows: bool = False,
    contiguous: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`flashmla.flash_mla_sparse_fwd` (FlashMLA's §8.4 generator)."""
    g = torch.Generator().manual_seed(seed)

    def data(*shape: int) -> Tensor:
        offset = (torch.rand((), generator=g) - 0.5) * 0.1
        return (torch.randn(*shape, generator=g) / 10 + offset).clamp(-10, 10).to(torch.bfloat16)

    q, kv = data(s_q, h_q, d_qk), data(s_kv, 1, d_qk)
    idx = torch.empty(s_q, 1, topk, dtype=torch.int64)
    for t in range(s_q):
        take = min(topk, s_kv)
        idx[t, 0, :take] = torch.randperm(s_kv, generator=g)[:take]
        if topk > take:
            pick = torch.randint(len(INVALID_INDEX_VALUES) + 1, (topk - take,), generator=g)
            choices = torch.tensor([*INVALID_INDEX_VALUES, s_kv])
            idx[t, 0, take:] = choices[pick]
    if invalid_rows:
        rows = torch.rand(s_q, generator=g) < 0.02
        rows[0] = True
        idx[rows] = INVALID_INDEX_VALUES[torch.randint(len(INVALID_INDEX_VALUES), (), generator=g)]
    inputs: dict[str, Any] = dict(q=q, kv=kv, indices=idx.to(torch.int32), sm_scale=0.5, d_v=512)
    if attn_sink:
        inputs["attn_sink"] = torch.randn(h_q, generator=g)
    if topk_length:
        inputs["topk_length"] = torch.randint(0, max(topk, 63) + 1, (s_q,), generator=g).clamp(max=topk).to(torch.int32)
    device = torch.device(device)
    for key, value in list(inputs.items()):
        if isinstance(value, Tensor):
            value = value.to(device)
            if not contiguous and key in ("q", "kv", "indices"):
                value = non_contiguous(value)
            inputs[key] = value
    return inputs


# --------------------------------------------------------------------------------------------
# Dense MHA prefill


def mha_inputs(
    b: int,
    mean_s_q: int,
    mean_s_k: int,
    h_q: int,
    *,
    h_kv: int | None = None,
    d_qk: int = 128,
    d_v: int = 128,
    varlen: bool = False,
    causal: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    requires_grad: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`flashmla.flash_attn_varlen_func` (§8.5: s_k >= s_q)."""
    g = torch.Generator().manual_seed(seed)
    h_kv = h_kv or h_q
    if varlen:
        lq = torch.normal(float(mean_s_q), mean_s_q / 2, (b,), generator=g).round().clamp(min=1)
        lk = torch.normal(float(mean_s_k), mean_s_k / 2, (b,), generator=g).round()
        lk = torch.maximum(lk, lq)
    else:
        lq, lk = torch.full((b,), float(mean_s_q)), torch.full((b,), float(max(mean_s_k, mean_s_q)))
    lq, lk = lq.long(), lk.long()
    cu_q = torch.zeros(b + 1, dtype=torch.int32)
    cu_k = torch.zeros(b + 1, dtype=torch.int32)
    cu_q[1:], cu_k[1:] = lq.cumsum(0), lk.cumsum(0)
    device = torch.device(device)

    def data(*shape: int) -> Tensor:
        t = (torch.randn(*shape, generator=g) / 10).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return dict(
        q=data(int(cu_q[-1]), h_q, d_qk),
        k=data(int(cu_k[-1]), h_kv, d_qk),
        v=data(int(cu_k[-1]), h_kv, d_v),
        cu_seqlens_qo=cu_q.to(device),
        cu_seqlens_kv=cu_k.to(device),
        max_seqlen_qo=int(lq.max()),
        max_seqlen_kv=int(lk.max()),
        softmax_scale=(d_qk + 100) ** -0.5,
        causal=causal,
    )


# --------------------------------------------------------------------------------------------
# Reference results (fp32, unrounded)


def reference(op: str, inputs: dict[str, Any]) -> tuple[Tensor, ...]:
    """The reference backend's fp32 result for the inputs of a public function.

    ``op`` is "decode" (dense or sparse, by ``indices``), "sparse_prefill" or "mha_forward"."""
    from flashmla_ref import ops as ref  # the oracle is always installed with core

    from . import ops as api_ops
    from . import problems
    from .api import flash_mla_with_kvcache

    if op == "decode":
        bound = inspect.signature(flash_mla_with_kvcache).bind(**inputs)
        bound.apply_defaults()
        p = api_ops._decode_problem(*bound.arguments.values())
        run: Callable = ref.sparse_decode if isinstance(p, problems.SparseDecodeProblem) else ref.dense_decode
        return run(p, None, out_dtype=torch.float32)
    if op == "sparse_prefill":
        p = problems.build_sparse_prefill(
            inputs["q"], inputs["kv"], inputs["indices"], inputs["sm_scale"], inputs.get("d_v", 512),
            inputs.get("attn_sink"), inputs.get("topk_length"),
        )  # fmt: skip
        return ref.sparse_prefill(p, out_dtype=torch.float32)
    if op == "mha_forward":
        p = problems.build_mha(
            inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_qo"], inputs["cu_seqlens_kv"],
            inputs["max_seqlen_qo"], inputs["max_seqlen_kv"], 0.0, inputs.get("softmax_scale"),
            inputs.get("causal", False),
        )  # fmt: skip
        return ref.mha_forward(p, out_dtype=torch.float32)
    raise ValueError(f"unknown op {op!r}")


