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
    "mha": {
        "out": (1e-3, 8.01 / 128, 7e-6),
        "grad": (1e-3, 8.01 / 128, 7e-6),
        "lse": (1e-6, 2.01 / 65536, 1e-7),
    },
}


# --------------------------------------------------------------------------------------------
# Comparison


def compare(
    ans: Tensor, ref: Tensor, abs_tol: float, rel_tol: float, cos_diff_tol: float
) -> list[str]:
    """Everything wrong with ``ans`` against ``ref`` (an empty list means they match)."""
    problems = []
    if ans.shape != ref.shape:
        return [f"shape {tuple(ans.shape)} != {tuple(ref.shape)}"]
    a, r = ans.double(), ref.double()
    for name, test in (
        ("nan", torch.isnan),
        ("+inf", lambda x: x == math.inf),
        ("-inf", lambda x: x == -math.inf),
    ):
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


def assert_close(
    name: str, ans: Tensor, ref: Tensor, tolerance: tuple[float, float, float]
) -> None:
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


class _Rng:
    """A seeded generator on the target device, so large benchmark inputs never touch the host."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.g = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g, device=self.device)

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.g, device=self.device)

    def randint(self, high: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(high, shape, generator=self.g, device=self.device)

    def randperm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.g, device=self.device)


def _lengths(b: int, s_k: int, s_q: int, varlen: bool, zero_frac: float, rng: _Rng) -> list[int]:
    if varlen:
        lens = (rng.randn(b) * (s_k / 2) + s_k).round().clamp(min=s_q)
    else:
        lens = torch.full((b,), float(s_k), device=rng.device)
    if zero_frac > 0:
        lens = torch.where(rng.rand(b) < zero_frac, 0.0, lens)
    return [int(n) for n in lens.tolist()]


def _block_table(blocks: list[int], width: int, num_blocks: int, fill: int, rng: _Rng) -> Tensor:
    """Request i gets ``blocks[i]`` distinct pages of a random permutation; the rest is ``fill``."""
    order = rng.randperm(num_blocks)
    count = torch.tensor(blocks, device=rng.device)
    start = torch.cumsum(count, 0) - count
    col = torch.arange(width, device=rng.device)
    used = col < count[:, None]
    pick = order[(start[:, None] + col).clamp(max=num_blocks - 1)]
    return torch.where(used, pick, fill).to(torch.int32)


def _token_slots(table: Tensor, lengths: list[int], page: int) -> Tensor:
    """Flat slots of every live token (logical positions below each request's length)."""
    pos = torch.arange(table.shape[1] * page, device=table.device)
    live = pos < torch.tensor(lengths, device=table.device)[:, None]
    slots = table.long()[:, pos // page] * page + pos % page
    return slots[live]


def _fill_cache(
    cache: Tensor, fmt: CacheFormat, d: int, rng: _Rng, chunk_tokens: int = 1 << 18
) -> None:
    """Fill a paged cache with ``randn / 10`` clamped to ±1, chunk by chunk (FP8 quantized)."""
    num_blocks, page, h_kv = cache.shape[0], cache.shape[1], cache.shape[2]
    per_chunk = max(1, chunk_tokens // page)
    for b0 in range(0, num_blocks, per_chunk):
        nb = min(per_chunk, num_blocks - b0)
        values = (rng.randn(nb * page, h_kv, d) / 10).clamp(-1, 1)
        if fmt.is_fp8:
            slots = torch.arange(b0 * page, (b0 + nb) * page, device=rng.device)
            write_kv_cache(cache, values.to(torch.bfloat16), slots, is_fp8=True)
        else:
            cache[b0 : b0 + nb] = values.view(nb, page, h_kv, d).to(cache.dtype)


def _poison_tokens(cache: Tensor, fmt: CacheFormat, dead: Tensor) -> None:
    """NaN into every value of the tokens at flat slots ``dead``: NaN for plain caches, 0xFF
    bytes (NaN as e4m3, float32 and bf16) over the whole record and scales of FP8 ones."""
    page = cache.shape[1]
    block, offset = dead // page, dead % page
    if not fmt.is_fp8:
        cache[block, offset] = math.nan
        return
    raw = cache.view(torch.uint8)
    if fmt is CacheFormat.FP8_V32:
        raw[block, offset] = 0xFF
        return
    pages = raw.view(cache.shape[0], page * 584)
    for start, width in ((offset * 576, 576), (page * 576 + offset * 8, 7)):
        idx = start[:, None] + torch.arange(width, device=cache.device)
        pages[block[:, None], idx] = 0xFF


def _new_cache(
    fmt: CacheFormat, num_blocks: int, page: int, h_kv: int, d: int, device: torch.device
) -> Tensor:
    if fmt.is_fp8:
        align = 576 if fmt is CacheFormat.FP8_MODEL1 else None
        return allocate_paged_cache(
            num_blocks, page, cache_format=fmt, device=device, page_align=align
        )
    dtype = torch.bfloat16 if fmt is CacheFormat.BF16 else torch.float16
    return torch.empty(num_blocks, page, h_kv, d, dtype=dtype, device=device)


def _dead_slots(capacity: int, live: Tensor) -> Tensor:
    alive = torch.zeros(capacity, dtype=torch.bool, device=live.device)
    alive[live] = True
    return (~alive).nonzero().flatten()


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
    seqlens: list[int] | None = None,
    poison: bool = True,
    contiguous: bool = True,
    softmax_scale: float | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of :func:`flashmla.flash_mla_with_kvcache` for a dense decode case.

    Pages are a random permutation; with ``poison``, pages nobody owns and rows past each
    request's length hold NaN, and unused block-table entries hold an out-of-range page id."""
    device = torch.device(device)
    rng = _Rng(seed, device)
    fmt = CacheFormat(cache_format or ("bf16" if dtype == torch.bfloat16 else "fp16"))
    d = fmt.head_dim or 576
    page = page_block_size
    lengths = (
        list(seqlens) if seqlens is not None else _lengths(b, s_k, s_q, varlen, zero_frac, rng)
    )
    blocks = [math.ceil(n / page) for n in lengths]
    width = max(max(blocks), 1) + (1 if poison else 0)  # a spare column of unused entries
    num_blocks = max(sum(blocks), 1) + (2 if poison else 0)  # spare pages nobody owns
    table = _block_table(blocks, width, num_blocks, UNUSED_PAGE_ID if poison else 0, rng)
    cache = _new_cache(fmt, num_blocks, page, h_kv, d, device)
    _fill_cache(cache, fmt, d, rng)
    if poison:
        _poison_tokens(
            cache, fmt, _dead_slots(num_blocks * page, _token_slots(table, lengths, page))
        )
    q_dtype = torch.bfloat16 if fmt.is_fp8 else dtype
    q = (rng.randn(b, s_q, h_q, d) / 10).clamp(-1, 1).to(q_dtype)
    if not contiguous:
        q, table = non_contiguous(q), non_contiguous(table)
        cache = non_contiguous(cache, keep_inner=3 if fmt.is_fp8 else 1)
    return dict(
        q=q,
        k_cache=cache,
        block_table=table,
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
        head_dim_v=512,
        tile_scheduler_metadata=None,
        softmax_scale=softmax_scale,
        causal=causal,
        is_fp8_kvcache=fmt.is_fp8,
    )


# --------------------------------------------------------------------------------------------
# Sparse decode


def _random_positions(rows: int, length: Tensor, topk: int, s_k: int, rng: _Rng) -> Tensor:
    """``[rows, topk]`` distinct random positions below each row's ``length`` (in random order),
    ``-1`` where a row has fewer than ``topk``."""
    k = min(topk, s_k)
    score = rng.rand(rows, s_k).masked_fill(
        torch.arange(s_k, device=rng.device) >= length[:, None], -1.0
    )
    value, pos = score.topk(k, dim=1)
    pos = torch.where(value >= 0, pos, -1)
    if k < topk:
        pos = torch.cat([pos, pos.new_full((rows, topk - k), -1)], dim=1)
    return pos


def _with_invalid(idx: Tensor, capacity: int, rng: _Rng, frac: float = 0.05) -> Tensor:
    """Replace a fraction of entries by invalid values of every kind (negative, past the end)."""
    choices = torch.tensor([*INVALID_INDEX_VALUES, capacity, capacity + 7], device=rng.device)
    pick = choices[rng.randint(len(choices), tuple(idx.shape))]
    return torch.where(rng.rand(*idx.shape) < frac, pick, idx.long())


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
    """Keyword arguments of :func:`flashmla.flash_mla_with_kvcache` for a sparse decode case
    (§8.3): per row, distinct random tokens of the request (``-1`` beyond its length) as flat
    slots through a random block table; every token no valid index references is NaN."""
    device = torch.device(device)
    rng = _Rng(seed, device)
    fmt = CacheFormat(cache_format)
    d = fmt.head_dim or 576
    s_k = s_k or max(topk, 64)

    def cache_and_indices(k: int, page: int) -> tuple[Tensor, Tensor]:
        lengths = [min(n, s_k) for n in _lengths(b, s_k, 1, varlen, zero_length_frac, rng)]
        blocks = [max(math.ceil(n / page), 1) for n in lengths]
        num_blocks = sum(blocks) + 1
        table = _block_table(blocks, max(blocks), num_blocks, 0, rng).long()
        length = torch.tensor(lengths, device=device).repeat_interleave(s_q)
        pos = _random_positions(b * s_q, length, k, s_k, rng).view(b, s_q, k)
        rows = table[:, None, :].expand(b, s_q, -1)
        slots = torch.gather(rows, 2, (pos.clamp(min=0) // page)) * page + pos.clamp(min=0) % page
        idx = torch.where(pos >= 0, slots, -1)
        capacity = num_blocks * page
        if out_of_range:
            idx = _with_invalid(idx, capacity, rng)
        cache = _new_cache(fmt, num_blocks, page, 1, d, device)
        _fill_cache(cache, fmt, d, rng)
        if poison:
            ok = (idx >= 0) & (idx < capacity)
            _poison_tokens(cache, fmt, _dead_slots(capacity, idx[ok]))
        return cache, idx.to(torch.int32)

    cache, indices = cache_and_indices(topk, page_block_size)
    inputs: dict[str, Any] = dict(
        q=rng.randn(b, s_q, h_q, d).clamp(-1, 1).to(torch.bfloat16),
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
        inputs["topk_length"] = rng.randint(topk + 1, (b,)).to(torch.int32)
    if attn_sink:
        r = rng.rand(h_q)
        sink = torch.where(r < 0.31, math.inf, torch.where(r > 0.69, -math.inf, rng.randn(h_q)))
        inputs["attn_sink"] = sink
    if extra_topk is not None:
        extra_cache, extra_idx = cache_and_indices(extra_topk, extra_page_block_size)
        inputs["extra_k_cache"], inputs["extra_indices_in_kvcache"] = extra_cache, extra_idx
        if extra_topk_length:
            inputs["extra_topk_length"] = rng.randint(extra_topk + 1, (b,)).to(torch.int32)
    if not contiguous:
        for key in ("q", "indices", "extra_indices_in_kvcache"):
            if key in inputs:
                inputs[key] = non_contiguous(inputs[key])
        for key in ("k_cache", "extra_k_cache"):
            if key in inputs:
                inputs[key] = non_contiguous(inputs[key], keep_inner=3)
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
    """Keyword arguments of :func:`flashmla.flash_mla_sparse_fwd` (FlashMLA's §8.4 generator):
    distinct in-range indices, the excess over ``s_kv`` filled with invalid values of every kind."""
    device = torch.device(device)
    rng = _Rng(seed, device)

    def data(*shape: int) -> Tensor:
        offset = (rng.rand(1) - 0.5) * 0.1
        return (rng.randn(*shape) / 10 + offset).clamp(-10, 10).to(torch.bfloat16)

    q, kv = data(s_q, h_q, d_qk), data(s_kv, 1, d_qk)
    pos = _random_positions(s_q, torch.full((s_q,), s_kv, device=device), topk, s_kv, rng)
    if topk > s_kv:
        choices = torch.tensor([*INVALID_INDEX_VALUES, s_kv], device=device)
        pos = torch.where(pos < 0, choices[rng.randint(len(choices), tuple(pos.shape))], pos)
    if invalid_rows:
        rows = rng.rand(s_q) < 0.02
        rows[0] = True
        pos = torch.where(
            rows[:, None],
            INVALID_INDEX_VALUES[int(rng.randint(len(INVALID_INDEX_VALUES), (1,)))],
            pos,
        )
    inputs: dict[str, Any] = dict(
        q=q, kv=kv, indices=pos.view(s_q, 1, topk).to(torch.int32), sm_scale=0.5, d_v=512
    )
    if attn_sink:
        inputs["attn_sink"] = rng.randn(h_q)
    if topk_length:
        inputs["topk_length"] = (
            rng.randint(max(topk, 63) + 1, (s_q,)).clamp(max=topk).to(torch.int32)
        )
    if not contiguous:
        for key in ("q", "kv", "indices"):
            inputs[key] = non_contiguous(inputs[key])
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
    device = torch.device(device)
    rng = _Rng(seed, device)
    h_kv = h_kv or h_q
    lq = _lengths(b, mean_s_q, 1, varlen, 0.0, rng)
    lk = [max(k, q) for k, q in zip(_lengths(b, mean_s_k, 1, varlen, 0.0, rng), lq)]
    cu_q = torch.tensor([0, *lq], device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lk], device=device).cumsum(0).to(torch.int32)

    def data(*shape: int) -> Tensor:
        return (rng.randn(*shape) / 10).to(dtype).requires_grad_(requires_grad)

    return dict(
        q=data(sum(lq), h_q, d_qk),
        k=data(sum(lk), h_kv, d_qk),
        v=data(sum(lk), h_kv, d_v),
        cu_seqlens_qo=cu_q,
        cu_seqlens_kv=cu_k,
        max_seqlen_qo=max(lq),
        max_seqlen_kv=max(lk),
        softmax_scale=(d_qk + 100) ** -0.5,
        causal=causal,
    )


# --------------------------------------------------------------------------------------------
# Reference results (fp32, unrounded)


def problem_for(op: str, inputs: dict[str, Any]) -> Any:
    """The validated problem a public function builds from ``inputs`` (without running it).

    ``op`` is "decode" (dense or sparse, by ``indices``), "sparse_prefill" or "mha_forward"."""
    from . import ops, problems
    from .api import flash_mla_sparse_fwd, flash_mla_with_kvcache

    if op == "decode":
        bound = inspect.signature(flash_mla_with_kvcache).bind(**inputs)
        bound.apply_defaults()
        return ops._decode_problem(*bound.arguments.values())
    if op == "sparse_prefill":
        bound = inspect.signature(flash_mla_sparse_fwd).bind(**inputs)
        bound.apply_defaults()
        return problems.build_sparse_prefill(*bound.arguments.values())
    if op in ("mha_forward", "mha_backward"):
        return problems.build_mha(
            inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens_qo"], inputs["cu_seqlens_kv"],
            inputs["max_seqlen_qo"], inputs["max_seqlen_kv"], 0.0, inputs.get("softmax_scale"),
            inputs.get("causal", False), backward=op == "mha_backward",
        )  # fmt: skip
    raise ValueError(f"unknown op {op!r}")


def reference(op: str, inputs: dict[str, Any]) -> tuple[Tensor, ...]:
    """The reference backend's fp32 (unrounded) result for the inputs of a public function."""
    from flashmla_ref import ops as ref  # the oracle is always installed with core

    from .problems import SparseDecodeProblem

    p = problem_for(op, inputs)
    if op == "decode":
        run: Callable = (
            ref.sparse_decode if isinstance(p, SparseDecodeProblem) else ref.dense_decode
        )
        return run(p, None, out_dtype=torch.float32)
    if op == "sparse_prefill":
        return ref.sparse_prefill(p, out_dtype=torch.float32)
    return ref.mha_forward(p, out_dtype=torch.float32)
