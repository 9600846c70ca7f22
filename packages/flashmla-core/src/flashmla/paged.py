"""Paged KV-cache helpers: allocation, block tables, writing tokens, slot arithmetic, footprint.

A paged cache is ``[num_blocks, page_block_size, h_kv, width]``; request i's logical token j
lives in page ``block_table[i, j // B]`` at row ``j % B``, i.e. at the *flat slot*
``block_table[i, j // B] * B + j % B``. Sparse attention takes flat slots as indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import execute, ops, problems
from .formats import CacheFormat


def allocate_paged_cache(
    num_blocks: int,
    page_block_size: int,
    *,
    cache_format: CacheFormat | str = CacheFormat.BF16,
    h_kv: int = 1,
    head_dim: int = 576,
    device: torch.device | str = "cpu",
    page_align: int | None = None,
) -> Tensor:
    """A zeroed cache ``[num_blocks, B, h_kv, width]``.

    Plain formats store ``head_dim`` values per head. FP8 formats store bytes (uint8 view of
    ``float8_e4m3fn``-compatible records), one KV head, width 656 or 584. ``page_align`` pads the
    byte stride between pages to a multiple of it (FlashMLA's MODEL1 test cache pads to 576).
    """
    fmt = CacheFormat(cache_format)
    if not fmt.is_fp8:
        dtype = torch.bfloat16 if fmt is CacheFormat.BF16 else torch.float16
        return torch.zeros(num_blocks, page_block_size, h_kv, head_dim, dtype=dtype, device=device)
    width = fmt.bytes_per_token
    page = page_block_size * width
    stride = page if page_align is None else math.ceil(page / page_align) * page_align
    buf = torch.zeros(num_blocks * stride, dtype=torch.uint8, device=device)
    return buf.as_strided((num_blocks, page_block_size, 1, width), (stride, width, width, 1))


def make_block_table(
    cache_seqlens: Tensor,
    page_block_size: int,
    *,
    max_blocks_per_seq: int | None = None,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Give each request the pages it needs; returns ``(block_table int32 [b, max_blocks],
    num_blocks)``. Pages are a random permutation when ``shuffle`` (as FlashMLA's tests do);
    unused table entries are 0. Reads ``cache_seqlens`` on the host (a setup helper)."""
    lengths = cache_seqlens.tolist()
    needed = [math.ceil(n / page_block_size) for n in lengths]
    width = max(max(needed, default=0), 1) if max_blocks_per_seq is None else max_blocks_per_seq
    total = max(sum(needed), 1)
    order = torch.randperm(total, generator=generator) if shuffle else torch.arange(total)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        table[i, :n] = order[start : start + n].to(torch.int32)
        start += n
    return table.to(cache_seqlens.device), total


def write_kv_cache(
    kv_cache: Tensor, new_kv: Tensor, slot_mapping: Tensor, *, is_fp8: bool | None = None
) -> None:
    """Write ``new_kv [n, h_kv, d]`` into flat slots ``slot_mapping [n]`` of a paged cache,
    quantizing on write for FP8 caches. Slots outside ``[0, num_blocks * B)`` (``-1`` included)
    are skipped. ``is_fp8`` defaults to "the cache holds bytes"."""
    if is_fp8 is None:
        is_fp8 = kv_cache.element_size() == 1
    if torch.compiler.is_compiling():
        ops.cache_write(kv_cache, new_kv, slot_mapping, is_fp8)
        return
    execute.run_cache_write(problems.build_cache_write(kv_cache, new_kv, slot_mapping, is_fp8))


def slots_for_positions(block_table: Tensor, positions: Tensor, page_block_size: int) -> Tensor:
    """Flat slots of logical token ``positions [b, ...]`` of each request (int32, same shape).

    Positions that are negative or beyond the block table's capacity map to ``-1`` (invalid),
    as do positions whose page id is negative or whose slot would not fit in int32 (such as
    FlashMLA's unused-entry filler 2147480000)."""
    b, width = block_table.shape
    pos = positions.to(torch.int64)
    valid = (pos >= 0) & (pos < width * page_block_size)
    page_idx = torch.where(valid, pos // page_block_size, 0).reshape(b, -1)
    pages = torch.gather(block_table.to(torch.int64), 1, page_idx).reshape(pos.shape)
    slots = pages * page_block_size + pos % page_block_size
    return torch.where(valid & (pages >= 0) & (slots < 2**31), slots, -1).to(torch.int32)


# --------------------------------------------------------------------------------------------
# Footprint


@dataclass(frozen=True)
class AttentionShape:
    """The per-layer KV layout of a model, for footprint arithmetic."""

    kind: str  # "mla", "mha" or "gqa"
    num_kv_heads: int = 1
    head_dim_k: int = 576
    head_dim_v: int = 0  # MLA: V is inside K


def kv_bytes_per_token(shape: AttentionShape, cache_format: CacheFormat | str = "bf16") -> int:
    """Bytes one token costs in one layer's cache.

    MLA keeps one latent row per token (576 values; 656 bytes as fp8_v32, 584 as fp8_model1).
    MHA/GQA keep K and V for every KV head (an FP8 format here means 1 byte per value)."""
    fmt = CacheFormat(cache_format)
    if shape.kind == "mla":
        if fmt.is_fp8:
            return fmt.bytes_per_token
        return shape.head_dim_k * 2
    per_value = 1 if fmt.is_fp8 else 2
    return shape.num_kv_heads * (shape.head_dim_k + shape.head_dim_v) * per_value


def kv_cache_bytes(
    shape: AttentionShape,
    num_tokens: int,
    num_layers: int,
    cache_format: CacheFormat | str = "bf16",
) -> int:
    return kv_bytes_per_token(shape, cache_format) * num_tokens * num_layers


DEEPSEEK_V3_MLA = AttentionShape("mla", 1, 576, 0)
DEEPSEEK_V3_AS_MHA = AttentionShape("mha", 128, 192, 128)  # what MLA avoids caching
GQA_8x128 = AttentionShape("gqa", 8, 128, 128)  # a Llama-style 8-KV-head layer

__all__ = [
    "DEEPSEEK_V3_AS_MHA",
    "DEEPSEEK_V3_MLA",
    "AttentionShape",
    "GQA_8x128",
    "allocate_paged_cache",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "make_block_table",
    "slots_for_positions",
    "write_kv_cache",
]
