"""Paged-cache write (``kernels/cache_write.cu``): plain rows copied as bits, FP8 layouts
quantized on write (byte-exact with :mod:`flashmla.formats`); out-of-range slots are skipped.
The op moves a few hundred bytes per token: memory-bound, one warp per row, no tuning."""

from __future__ import annotations

import torch

from flashmla.formats import CacheFormat
from flashmla.problems import CacheWriteProblem

from .compiler import Build
from .launch import I32, I64, PTR, kernel, pack, ptr, struct_type

BUILD = Build.of("cache_write.cu")
WARPS = 8  # rows per CTA (the kernel's WARPS)
KERNEL_NAMES = {CacheFormat.FP8_V32: "write_v32", CacheFormat.FP8_MODEL1: "write_model1"}

PARAMS = struct_type(
    [(name, PTR) for name in ("cache", "new_kv", "slots")]
    + [(name, I64) for name in (
        "capacity", "c_b", "c_t", "c_h", "c_d", "n_t", "n_h", "n_d", "slot_stride",
    )]
    + [(name, I32) for name in ("n", "h_kv", "d", "page_size", "slot64")]
)  # fmt: skip


def builds(cc: tuple[int, int]) -> list[Build]:
    """Every compiled variant (one source, three kernels, the same on every ``cc``)."""
    return [BUILD]


def cache_write(p: CacheWriteProblem) -> None:
    """Write ``p.new_kv [n, h_kv, d]`` into flat slots ``p.slot_mapping`` of ``p.kv_cache``,
    quantizing for FP8 caches; slots outside ``[0, num_blocks * B)`` are skipped."""
    cache, new_kv, slots = p.kv_cache, p.new_kv, p.slot_mapping
    n, h_kv, d = new_kv.shape
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    fmt = p.cache_format
    rows = n if fmt.is_fp8 else n * h_kv
    values = {
        "cache": ptr(cache),
        "new_kv": ptr(new_kv),
        "slots": ptr(slots),
        "capacity": num_blocks * page_size,
        # FP8 caches are byte containers: stride(0) is bytes, the rest is fixed by the layout
        "c_b": cache.stride(0),
        "c_t": cache.stride(1),
        "c_h": cache.stride(2),
        "c_d": cache.stride(3),
        "n_t": new_kv.stride(0),
        "n_h": new_kv.stride(1),
        "n_d": new_kv.stride(2),
        "slot_stride": slots.stride(0),
        "n": n,
        "h_kv": h_kv,
        "d": d,
        "page_size": page_size,
        "slot64": int(slots.dtype == torch.int64),
    }
    with torch.cuda.device(cache.device):
        k = kernel(BUILD, KERNEL_NAMES.get(fmt, "write_plain"), cache.device)
        k((-(-rows // WARPS),), WARPS * 32, pack(PARAMS, values))
