"""Launchers of the MLA attention kernel (``kernels/mla_attention.cu``): dense decode, sparse
decode, sparse prefill.

Decode follows FlashMLA's persistent split-KV design: a schedule (computed on the GPU by
:mod:`.splitkv`) gives each CTA a contiguous run of 64-token blocks; requests cut into several
pieces are merged by the combine kernel. Sparse prefill gives each query token its own CTA (its
work is uniform)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from flashmla.formats import CacheFormat
from flashmla.problems import (
    DenseDecodeProblem,
    SparseDecodeProblem,
    SparsePrefillProblem,
    row_groups,
)
from flashmla.scheduler import DecodePlan, Schedule, device_sm_count

from . import splitkv
from .compiler import Build
from .launch import F32, I32, I64, PTR, Launch, kernel, max_smem, ptr, struct_type

LOG2E = 1.4426950408889634
D_V = 512
FMT_CODE = {
    CacheFormat.BF16: 0,
    CacheFormat.FP16: 0,
    CacheFormat.FP8_V32: 1,
    CacheFormat.FP8_MODEL1: 2,
}
RAW_BYTES = {1: 656, 2: 576 + 16}  # FP8 record staged per token (kernel's RAW)

PARAMS = struct_type(
    [(name, PTR) for name in (
        "q", "out", "lse", "max_logits", "o_acc", "lse_acc", "cache", "slots", "lengths",
        "cache2", "slots2", "lengths2", "sink", "metadata", "num_splits",
    )]
    + [(name, I64) for name in (
        "q_b", "q_t", "q_h", "o_b", "o_t", "o_h", "l_b", "l_t", "l_h",
        "page_stride", "row_stride", "head_stride", "page_stride2", "row_stride2",
        "slot_b", "slot_t", "slot2_b", "slot2_t",
    )]
    + [(name, I32) for name in (
        "num_pages", "page", "list_len", "page_shift", "num_pages2", "page2", "list_len2",
        "page2_shift",
        "s_q", "group", "rows", "h_q", "causal", "copy8",
    )]
    + [("scale_log2", F32)]
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    warps: int
    stages: int
    ctas_per_sm: int = 1  # persistent CTAs per SM: two small ones overlap each other's barriers
    qreg: bool = False  # 16-row tiles: Q K^T split over the head dim, queries in registers


def smem_bytes(cfg: Config, fmt: int, d_qk: int) -> int:
    """Dynamic shared memory of the kernel's layout (queries, key tiles, raw FP8 records,
    P, row reductions and factors, 16-row tiles' partial scores, validity flags); the kernel
    traps if given less."""
    key_tiles = (cfg.stages if fmt == 0 else 1) * cfg.block_n * d_qk * 2
    raw = 0 if fmt == 0 else cfg.stages * cfg.block_n * RAW_BYTES[fmt]
    col_splits = cfg.warps // (cfg.block_m // 16)
    return (
        cfg.block_m * d_qk * 2
        + key_tiles
        + raw
        + cfg.block_m * (cfg.block_n + 8) * 2
        + (col_splits + 1) * cfg.block_m * 4
        + (cfg.warps * 16 * (cfg.block_n + 8) * 4 if cfg.qreg else 0)  # partial scores
        + cfg.stages * cfg.block_n
    )


@functools.cache
def choose_config(rows: int, fmt: int, d_qk: int, smem_limit: int) -> Config:
    """Tiles for ``rows`` query rows per group. Few rows (memory-bound): 16-row tiles of 4 warps,
    two CTAs per SM with two stages each. Otherwise 32 or 64 rows with 8 warps, and 64-token
    tiles where shared memory holds two stages of them (else 32-token tiles, three stages if
    they fit). Devices with little shared memory get smaller row tiles (more passes over the
    cache, but it fits)."""
    if rows <= 16:
        cfg = Config(16, 32, 4, 2, ctas_per_sm=2, qreg=True)
        if 2 * smem_bytes(cfg, fmt, d_qk) + 1024 <= smem_limit:
            return cfg
    tiles = [(64, 8), (32, 8), (16, 4)]
    first = 2 if rows <= 16 else 1 if rows <= 32 else 0
    for block_m, warps in tiles[first:]:
        # 64-token tiles halve the per-tile costs (barriers, softmax bookkeeping); 32 fit more
        for block_n, stages in ((64, 2), (32, 3), (32, 2)):
            if block_m == 16 and block_n == 64:
                continue
            cfg = Config(block_m, block_n, warps, stages)
            if smem_bytes(cfg, fmt, d_qk) <= smem_limit:
                return cfg
    raise RuntimeError(f"the attention kernel needs more shared memory than the {smem_limit} here")


@functools.cache
def build_for(cfg: Config, fmt: int, d_qk: int, sparse: bool, fp16: bool) -> Build:
    return Build.of(
        "mla_attention.cu",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WARPS=cfg.warps, STAGES=cfg.stages, FMT=fmt,
        D_QK=d_qk, SPARSE=sparse, DTYPE_FP16=fp16, CTAS_PER_SM=cfg.ctas_per_sm, QREG=cfg.qreg,
    )  # fmt: skip


SMEM_LIMITS = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024,
               (10, 0): 227 * 1024, (12, 0): 99 * 1024}  # fmt: skip


def builds(cc: tuple[int, int]) -> list[Build]:
    """Every variant the tests and benchmark shapes use on a device of capability ``cc``."""
    limit = SMEM_LIMITS.get(cc, 99 * 1024)
    out = []
    for fmt, d_qk, sparse, fp16 in (
        (0, 576, False, False), (0, 576, False, True), (1, 576, False, False),
        (2, 512, False, False), (0, 576, True, False), (0, 512, True, False),
        (1, 576, True, False), (2, 512, True, False),
    ):  # fmt: skip
        for rows in (16, 32, 64):
            out.append(build_for(choose_config(rows, fmt, d_qk, limit), fmt, d_qk, sparse, fp16))
    return out


# --------------------------------------------------------------------------------------------
# Plans: the split-KV schedule and the accumulators of split requests


def _config_of(p: DenseDecodeProblem | SparseDecodeProblem) -> Config:
    rows, _, _ = row_groups(p)
    fmt = FMT_CODE[p.cache_format]
    return choose_config(rows, fmt, p.q.shape[3], max_smem(p.q.device))


def _schedule(p: DenseDecodeProblem | SparseDecodeProblem) -> Schedule:
    rows, axis1, _ = row_groups(p)
    cfg = _config_of(p)
    m_tiles = -(-rows // cfg.block_m)
    parts = max(device_sm_count(p.q.device) * cfg.ctas_per_sm // (m_tiles * axis1), 1)
    b = p.q.shape[0]
    if isinstance(p, SparseDecodeProblem):
        extra = p.extra_indices
        return splitkv.schedule(
            b=b, num_parts=parts, device=p.q.device, topk=p.indices.shape[2],
            topk_length=p.topk_length, extra_topk=None if extra is None else extra.shape[2],
            extra_topk_length=p.extra_topk_length,
        )  # fmt: skip
    return splitkv.schedule(b=b, num_parts=parts, device=p.q.device, seqlens=p.cache_seqlens)


def plan_dense_decode(p: DenseDecodeProblem) -> DecodePlan:
    return DecodePlan.of(p.q, p.schedule if p.schedule is not None else _schedule(p))


def plan_sparse_decode(p: SparseDecodeProblem) -> DecodePlan:
    return DecodePlan.of(p.q, p.schedule if p.schedule is not None else _schedule(p))


# --------------------------------------------------------------------------------------------
# Launch


def _aligned(t: Tensor, inner: int) -> bool:
    """16-byte aligned base and outer strides (``inner`` innermost dims left out)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (s * size) % 16 == 0 for s in t.stride()[: t.dim() - inner]
    )


def aligned_queries(q: Tensor) -> Tensor:
    if _aligned(q, 1):
        return q
    _warn_copy("q")
    return q.contiguous()


def _cache_args(cache: Tensor, fmt: CacheFormat) -> tuple[Tensor, dict, bool]:
    """(cache, byte strides {page, row, head}, copy8) in the kernel's terms."""
    if fmt.is_fp8:
        raw = cache.view(torch.uint8)
        copy8 = raw.stride(0) % 16 != 0 or raw.data_ptr() % 16 != 0
        if raw.stride(0) % 8 != 0 or raw.data_ptr() % 8 != 0:
            _warn_copy("the FP8 cache")
            raw = raw.contiguous()
        return raw, {"page": raw.stride(0), "row": raw.stride(1), "head": 0}, copy8
    size = cache.element_size()
    strides = [s * size for s in cache.stride()[:3]]
    if cache.data_ptr() % 8 != 0 or any(s % 8 for s in strides) or cache.stride(3) != 1:
        _warn_copy("the cache")
        cache = cache.contiguous()
        strides = [s * size for s in cache.stride()[:3]]
    copy8 = cache.data_ptr() % 16 != 0 or any(s % 16 for s in strides)
    return cache, dict(zip(("page", "row", "head"), strides, strict=True)), copy8


_WARNED: set[str] = set()


def warn_once(message: str, stacklevel: int = 4) -> None:
    """A warning about a slow path, given once per process (calls repeat every layer)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"flashmla-cuda: {message}", stacklevel=stacklevel)


def _warn_copy(what: str) -> None:
    warn_once(f"{what} is not 8-byte aligned; copying it to a contiguous tensor on every call "
              "(slow)", stacklevel=5)  # fmt: skip


def _launch_attention(
    *, q4: Tensor, out4: Tensor, lse: Tensor, lse_strides: tuple[int, int, int],
    max_logits: Tensor | None, cache: Tensor, fmt: CacheFormat, page: int, slots: Tensor,
    slot_strides: tuple[int, int], lengths: Tensor | None, list_len: int, extra: tuple | None,
    sink: Tensor | None, plan: DecodePlan | None, num_requests: int, rows: int, axis1: int,
    group: int, sparse: bool, causal: bool, scale: float,
) -> tuple[list[Launch], bool]:  # fmt: skip
    """Launch the attention kernel (and the combine, with a plan); returns the launches and
    whether they may be relaunched with new pointers (not if an input had to be copied)."""
    _b, s_q, h_q, d_qk = q4.shape
    code = FMT_CODE[fmt]
    cfg = choose_config(rows, code, d_qk, max_smem(q4.device))
    q_given, cache_given = q4, cache
    q4 = aligned_queries(q4)
    cache_t, cs, copy8 = _cache_args(cache, fmt)
    reusable = q4 is q_given and cache_t.data_ptr() == cache_given.data_ptr()
    values = {
        "q": ptr(q4), "out": ptr(out4), "lse": ptr(lse), "max_logits": ptr(max_logits),
        "o_acc": ptr(plan.o_acc) if plan else 0, "lse_acc": ptr(plan.lse_acc) if plan else 0,
        "cache": ptr(cache_t), "slots": ptr(slots), "lengths": ptr(lengths),
        "sink": ptr(sink),
        "metadata": ptr(plan.schedule.metadata) if plan else 0,
        "num_splits": ptr(plan.schedule.num_splits) if plan else 0,
        "q_b": q4.stride(0), "q_t": q4.stride(1), "q_h": q4.stride(2),
        "o_b": out4.stride(0), "o_t": out4.stride(1), "o_h": out4.stride(2),
        "l_b": lse_strides[0], "l_t": lse_strides[1], "l_h": lse_strides[2],
        "page_stride": cs["page"], "row_stride": cs["row"], "head_stride": cs["head"],
        "slot_b": slot_strides[0], "slot_t": slot_strides[1],
        "num_pages": cache.shape[0], "page": page, "list_len": list_len,
        "page_shift": _shift(page),
        "s_q": s_q, "group": group, "rows": rows, "h_q": h_q, "causal": int(causal),
        "scale_log2": scale * LOG2E,
    }  # fmt: skip
    if extra is not None:
        cache2, slots2, lengths2 = extra
        cache2_t, cs2, copy8_2 = _cache_args(cache2, fmt)
        copy8 = copy8 or copy8_2
        values.update(
            cache2=ptr(cache2_t), slots2=ptr(slots2), lengths2=ptr(lengths2),
            page_stride2=cs2["page"], row_stride2=cs2["row"], slot2_b=slots2.stride(0),
            slot2_t=slots2.stride(1), num_pages2=cache2.shape[0], page2=cache2.shape[1],
            list_len2=slots2.shape[2], page2_shift=_shift(cache2.shape[1]),
        )  # fmt: skip
    else:
        values.update(
            cache2=0, slots2=0, lengths2=0, page_stride2=0, row_stride2=0, slot2_b=0,
            slot2_t=0, num_pages2=0, page2=1, list_len2=0, page2_shift=0,
        )  # fmt: skip
    values["copy8"] = int(copy8)
    build = build_for(cfg, code, d_qk, sparse, q4.dtype == torch.float16)
    parts = plan.schedule.metadata.shape[0] if plan else num_requests
    grid = (-(-rows // cfg.block_m), axis1, parts)
    k = kernel(build, "mla_attention", q4.device)
    launches = [Launch.of(k, grid, cfg.warps * 32, PARAMS, values, smem_bytes(cfg, code, d_qk))]
    launches[0].run()
    if plan is not None:
        launches.append(
            splitkv.combine(
                o_acc=plan.o_acc,
                lse_acc=plan.lse_acc,
                num_splits=plan.schedule.num_splits,
                out=out4,
                lse=lse,
                lse_strides=lse_strides,
                sink=sink,
            )
        )
    return launches, reusable and extra is None


def _shift(page: int) -> int:
    """log2(page) for power-of-two pages (the kernel shifts instead of dividing), else -1."""
    return page.bit_length() - 1 if page & (page - 1) == 0 else -1


def on_device(device: torch.device):
    """The tensors' device as the current one (kernels launch on the current device)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def layout(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


def relaunch(plan: DecodePlan, key: tuple, pointers: dict[str, int | bytes], launch) -> None:
    """Relaunch the plan's launches for ``key`` (inputs of the same layout) with this call's
    pointers, or launch anew and keep them. ``pointers`` holds the attention kernel's tensor
    fields (a tensor map as its bytes); the combine takes ``out`` / ``lse`` / ``sink`` (0 when
    absent) from it. ``launch()`` runs both and returns (launches, whether they may be
    relaunched: not if an input had to be copied)."""
    found = plan.launches.get(key)
    if found is None:
        launches, reusable = launch()
        if reusable:
            plan.launches[key] = launches
        return
    attention, combine = found
    attention.run(pointers)
    combine.run({"out": pointers["out"], "lse": pointers["lse"], "sink": pointers.get("sink", 0)})


def dense_decode(p: DenseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    out, lse = p.empty_outputs()
    with on_device(p.q.device):
        plan = plan if plan is not None else plan_dense_decode(p)
        rows, axis1, group = row_groups(p)

        def launch() -> tuple[list[Launch], bool]:
            return _launch_attention(
                q4=p.q, out4=out, lse=lse,
                lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)), max_logits=None,
                cache=p.k_cache, fmt=p.cache_format, page=p.k_cache.shape[1],
                slots=p.block_table, slot_strides=(p.block_table.stride(0), 0),
                lengths=p.cache_seqlens, list_len=p.block_table.shape[1], extra=None,
                sink=None, plan=plan, num_requests=p.q.shape[0], rows=rows, axis1=axis1,
                group=group, sparse=False, causal=p.causal, scale=p.softmax_scale,
            )  # fmt: skip

        key = (
            "dense", layout(p.q), layout(p.k_cache), layout(p.block_table),
            layout(p.cache_seqlens), p.softmax_scale, p.causal,
        )  # fmt: skip
        pointers = {
            "q": p.q.data_ptr(), "out": out.data_ptr(), "lse": lse.data_ptr(),
            "cache": p.k_cache.data_ptr(), "slots": p.block_table.data_ptr(),
            "lengths": p.cache_seqlens.data_ptr(), "sink": 0,
        }  # fmt: skip
        relaunch(plan, key, pointers, launch)
    return out, lse


def sparse_decode(p: SparseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    out, lse = p.empty_outputs()
    with on_device(p.q.device):
        plan = plan if plan is not None else plan_sparse_decode(p)
        rows, axis1, group = row_groups(p)
        extra = None
        if p.extra_k_cache is not None:
            extra = (p.extra_k_cache, p.extra_indices, p.extra_topk_length)

        def launch() -> tuple[list[Launch], bool]:
            return _launch_attention(
                q4=p.q, out4=out, lse=lse,
                lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)), max_logits=None,
                cache=p.k_cache, fmt=p.cache_format, page=p.k_cache.shape[1], slots=p.indices,
                slot_strides=(p.indices.stride(0), p.indices.stride(1)),
                lengths=p.topk_length, list_len=p.indices.shape[2], extra=extra,
                sink=p.attn_sink, plan=plan, num_requests=p.q.shape[0], rows=rows,
                axis1=axis1, group=group, sparse=True, causal=False, scale=p.softmax_scale,
            )  # fmt: skip

        key = (
            "sparse", layout(p.q), layout(p.k_cache), layout(p.indices),
            layout(p.topk_length), layout(p.attn_sink), p.softmax_scale,
        )  # fmt: skip
        pointers = {
            "q": p.q.data_ptr(), "out": out.data_ptr(), "lse": lse.data_ptr(),
            "cache": p.k_cache.data_ptr(), "slots": p.indices.data_ptr(),
            "lengths": 0 if p.topk_length is None else p.topk_length.data_ptr(),
            "sink": 0 if p.attn_sink is None else p.attn_sink.data_ptr(),
        }  # fmt: skip
        relaunch(plan, key, pointers, launch)
    return out, lse


def sparse_prefill(p: SparsePrefillProblem) -> tuple[Tensor, Tensor, Tensor]:
    """Each query token is a one-token "request" over the bf16 ``kv`` seen as a paged cache of
    one-token pages (so flat slots are token indices and ``s_kv`` bounds them)."""
    out, max_logits, lse = p.empty_outputs()
    s_q, h_q, _d = p.q.shape
    with on_device(p.q.device):
        _launch_attention(  # one-off launches: sparse prefill has no plan to keep them in
            q4=p.q.unsqueeze(1), out4=out.unsqueeze(1), lse=lse,
            lse_strides=(lse.stride(0), 0, lse.stride(1)), max_logits=max_logits,
            cache=p.kv.unsqueeze(1), fmt=CacheFormat.BF16, page=1, slots=p.indices,
            slot_strides=(p.indices.stride(0), 0), lengths=p.topk_length,
            list_len=p.indices.shape[2], extra=None, sink=p.attn_sink, plan=None,
            num_requests=s_q, rows=h_q, axis1=1, group=h_q, sparse=True, causal=False,
            scale=p.sm_scale,
        )  # fmt: skip
    return out, max_logits, lse
