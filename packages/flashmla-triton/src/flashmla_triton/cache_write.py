"""Paged-cache write for the Triton backend: one program per token (and per head for plain
caches). The op moves a few hundred bytes per token, so it is memory-bound and needs no tuning.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from flashmla.formats import CacheFormat
from flashmla.problems import CacheWriteProblem

from .kernels.cache_write import fp8_write_kernel, plain_write_kernel
from .launch import Launch

MAX_BLOCK = 1024

# (TILE, NUM_TILES, TILES_P2) of each FP8 layout's NoPE part; both end with 64 bf16 RoPE values.
# MODEL1's TILES_P2 = 8 is also its 8-byte scale record (7 exponents + the zero pad byte).
_FP8_TILING = {CacheFormat.FP8_V32: (128, 4, 4), CacheFormat.FP8_MODEL1: (64, 7, 8)}


def cache_write_launches(p: CacheWriteProblem) -> list[Launch]:
    cache, new_kv, slots = p.kv_cache, p.new_kv, p.slot_mapping
    n, h_kv, d = new_kv.shape
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    common = {
        "new_ptr": new_kv, "slot_ptr": slots, "capacity": num_blocks * page_size,
        "page_size": page_size, "stride_slot": slots.stride(0),
    }  # fmt: skip
    if p.cache_format.is_fp8:
        tile, num_tiles, tiles_p2 = _FP8_TILING[p.cache_format]
        constexprs = {
            "MODEL1": p.cache_format is CacheFormat.FP8_MODEL1, "TILE": tile,
            "NUM_TILES": num_tiles, "TILES_P2": tiles_p2, "ROPE": 64,
        }  # fmt: skip
        args = {
            **common, **constexprs, "cache_ptr": cache.view(torch.uint8),
            "stride_page": cache.stride(0), "stride_nn": new_kv.stride(0),
            "stride_nd": new_kv.stride(2),
        }  # fmt: skip
        return [
            Launch(
                fp8_write_kernel, (n,), args, 4, 1, frozenset(constexprs), new_kv.device.index or 0
            )
        ]
    constexprs = {"D": d, "BLOCK": min(triton.next_power_of_2(d), MAX_BLOCK)}
    strides = (
        "stride_cb", "stride_ct", "stride_ch", "stride_cd", "stride_nn", "stride_nh", "stride_nd",
    )  # fmt: skip
    args = {
        **common, **constexprs, "cache_ptr": cache,
        **dict(zip(strides, cache.stride() + new_kv.stride(), strict=True)),
    }  # fmt: skip
    return [
        Launch(
            plain_write_kernel,
            (n, h_kv),
            args,
            4,
            1,
            frozenset(constexprs),
            new_kv.device.index or 0,
        )
    ]


def cache_write(p: CacheWriteProblem) -> None:
    """Write ``p.new_kv [n, h_kv, d]`` into flat slots ``p.slot_mapping`` of ``p.kv_cache``,
    quantizing for FP8 caches; out-of-range slots are skipped."""
    # Triton launches on the current CUDA device, which need not be the tensors' device
    dev = p.kv_cache.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for launch in cache_write_launches(p):
            launch()
