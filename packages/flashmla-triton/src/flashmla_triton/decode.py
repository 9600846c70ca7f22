"""Launchers of the MLA attention kernel: dense decode, sparse decode, sparse prefill.

Decode follows FlashMLA's persistent split-KV design: a schedule (one metadata row per part,
computed on the GPU by :mod:`.kernels.schedule`) gives each CTA a contiguous run of KV blocks;
requests cut into several pieces are merged by :mod:`.kernels.combine`. Sparse prefill gives each
query token its own program (its work is uniform)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from flashmla.formats import CacheFormat
from flashmla.problems import (
    DenseDecodeProblem,
    SparseDecodeProblem,
    SparsePrefillProblem,
    row_groups,
)
from flashmla.scheduler import OVERHEAD_BLOCKS, DecodePlan, Schedule, device_sm_count

from . import INTERPRET
from .kernels.attention import FMT_MODEL1, FMT_PLAIN, FMT_V32, LOG2E, mla_attention_kernel
from .kernels.combine import combine_kernel
from .kernels.schedule import schedule_kernel
from .launch import Launch

COMBINE_COLS = 128  # output columns per combine program (the grid's third axis covers 512)

FMT_CODE = {
    CacheFormat.BF16: FMT_PLAIN,
    CacheFormat.FP16: FMT_PLAIN,
    CacheFormat.FP8_V32: FMT_V32,
    CacheFormat.FP8_MODEL1: FMT_MODEL1,
}


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1  # persistent CTAs per SM (more when tiles are small)
    trans: bool = False  # tokens as the MMA's M dimension (few query rows)
    tma: bool = False  # bulk tensor copies for whole tiles of plain, page-contiguous caches


_CC: dict[int, tuple[int, int]] = {}


def target_cc(device: torch.device) -> tuple[int, int]:
    """The compute capability kernels are built for (Hopper's for CPU tensors: AOT tests)."""
    if device.type != "cuda":
        return (9, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cc = _CC.get(index)
    if cc is None:
        cc = _CC[index] = torch.cuda.get_device_capability(index)
    return cc


def choose_config(
    rows: int, fmt: CacheFormat = CacheFormat.BF16, cc: tuple[int, int] = (9, 0)
) -> Config:
    """Tiles for ``rows`` query rows per group (s_q * h_q / h_kv dense, h_q sparse).

    64-row tiles use Hopper's warpgroup MMA with two warpgroups splitting the 512 output
    columns; FP8 tiles are dequantized through registers, so they are not pipelined. Blackwell
    stages its operands differently and gets one stage (it fits shared memory)."""
    if INTERPRET:
        return Config(max(16, min(64, triton.next_power_of_2(rows))), 64, 4, 1)
    stages = 1 if fmt.is_fp8 or cc[0] >= 10 else 2
    if rows <= 32:  # tokens as M, queries as N: warpgroup MMA despite few rows; small tiles,
        # bulk copies and two CTAs per SM keep more bytes in flight (these shapes are memory-bound)
        return Config(16 if rows <= 16 else 32, 32, 4, stages, ctas_per_sm=2, trans=True, tma=True)
    return Config(64, 64, 8, stages)


def _num_parts(p: DenseDecodeProblem | SparseDecodeProblem) -> int:
    rows, axis1, _ = row_groups(p)
    cfg = choose_config(rows, p.cache_format, target_cc(p.q.device))
    m_tiles = triton.cdiv(rows, cfg.block_m)
    return max(device_sm_count(p.q.device) * cfg.ctas_per_sm // (m_tiles * axis1), 1)


def _schedule(p: DenseDecodeProblem | SparseDecodeProblem) -> Schedule:
    b = p.q.shape[0]
    parts = _num_parts(p)
    dev = p.q.device
    metadata = torch.empty(parts, 8, dtype=torch.int32, device=dev)
    num_splits = torch.empty(b + 1, dtype=torch.int32, device=dev)
    if isinstance(p, SparseDecodeProblem):
        extra = p.extra_indices
        schedule_kernel[(1,)](
            p.indices, p.topk_length, p.extra_topk_length, b, p.indices.shape[2],
            0 if extra is None else extra.shape[2], parts, metadata, num_splits,
            SPARSE=True, HAS_TOPK_LEN=p.topk_length is not None, HAS_EXTRA=extra is not None,
            HAS_EXTRA_LEN=p.extra_topk_length is not None, OVERHEAD=OVERHEAD_BLOCKS, CHUNK=1024,
        )  # fmt: skip
    else:
        schedule_kernel[(1,)](
            p.cache_seqlens, None, None, b, 0, 0, parts, metadata, num_splits,
            SPARSE=False, HAS_TOPK_LEN=False, HAS_EXTRA=False, HAS_EXTRA_LEN=False,
            OVERHEAD=OVERHEAD_BLOCKS, CHUNK=1024,
        )  # fmt: skip
    return Schedule(metadata, num_splits)


def plan_dense_decode(p: DenseDecodeProblem) -> DecodePlan:
    return DecodePlan.of(p.q, p.schedule if p.schedule is not None else _schedule(p))


def plan_sparse_decode(p: SparseDecodeProblem) -> DecodePlan:
    return DecodePlan.of(p.q, p.schedule if p.schedule is not None else _schedule(p))


def _cache_args(cache: Tensor, fmt: CacheFormat) -> tuple:
    """(tensor, page stride, row stride, head stride, pages) in the kernel's units."""
    if fmt.is_fp8:
        raw = cache.view(torch.uint8)
        return raw, raw.stride(0), raw.stride(1), 0, cache.shape[0]
    return cache, cache.stride(0), cache.stride(1), cache.stride(2), cache.shape[0]


def _descriptors(cache: Tensor, block_n: int, d_nope: int, d_rope: int) -> tuple:
    """Bulk-copy descriptors of a plain page-contiguous cache seen as a [tokens, h_kv * d] matrix:
    NoPE tiles and RoPE tiles of ``block_n`` tokens."""
    rows, row_stride = cache.shape[0] * cache.shape[1], cache.stride(1)
    view = cache.as_strided((rows, cache.shape[2] * cache.shape[3]), (row_stride, 1))
    shape, strides = list(view.shape), [row_stride, 1]
    return (
        TensorDescriptor(view, shape, strides, [block_n, d_nope]),
        TensorDescriptor(view, shape, strides, [block_n, d_rope]),
    )


def _tma_ok(cache: Tensor, fmt: CacheFormat, page: int, block_n: int, sparse: bool) -> bool:
    """Bulk copies need a plain cache whose pages follow each other in memory (so the cache is
    one 2-D row-major matrix of tokens), 16-byte aligned, tiles within pages, and Hopper+."""
    return (
        not sparse
        and not fmt.is_fp8
        and page % block_n == 0
        and cache.stride(0) == page * cache.stride(1)
        and cache.stride(2) == cache.shape[3]
        and cache.data_ptr() % 16 == 0
        and (cache.stride(1) * cache.element_size()) % 16 == 0
        and (INTERPRET or target_cc(cache.device) >= (9, 0))
    )


def _fp8_hardware(device: torch.device) -> bool:
    """Whether to convert e4m3 in hardware (compute capability 8.9 and newer). The interpreter
    runs the bit-arithmetic path, the one older GPUs use."""
    return not INTERPRET and target_cc(device) >= (8, 9)


def _dims(fmt: CacheFormat, d: int) -> tuple[int, int]:
    """(D_NOPE, D_ROPE): MODEL1 and 512-dim plain rows have no separate RoPE tile."""
    if fmt is CacheFormat.FP8_MODEL1 or d == 512:
        return 512, 0
    return 512, 64


def attention_launches(
    *, q4: Tensor, out4: Tensor, lse_strides: tuple[int, int, int], lse: Tensor,
    max_logits: Tensor | None, cache: Tensor, fmt: CacheFormat, page: int,
    slots: Tensor, slot_strides: tuple[int, int], lengths: Tensor | None, list_len: int,
    extra: tuple | None, sink: Tensor | None, plan: DecodePlan | None, num_requests: int,
    rows: int, axis1: int, group: int, sparse: bool, causal: bool, scale: float,
) -> list[Launch]:  # fmt: skip
    """The attention kernel's launch (and the combine's, for a split-KV schedule)."""
    cfg = choose_config(rows, fmt, target_cc(q4.device))
    b, s_q, h_q, d = q4.shape
    persistent = plan is not None
    parts = plan.schedule.metadata.shape[0] if persistent else num_requests
    o_acc, lse_acc = (plan.o_acc, plan.lse_acc) if persistent else (lse, lse)  # unused if not
    cache_t, sp, sr, sh, pages = _cache_args(cache, fmt)
    if extra is not None:
        extra_cache, extra_slots, extra_len = extra
        c2, sp2, sr2, _, pages2 = _cache_args(extra_cache, fmt)
        extra_args = (c2, sp2, sr2, pages2, extra_slots, extra_slots.stride(0), extra_slots.stride(1),
                      extra_len, extra_slots.shape[2])  # fmt: skip
        page2 = extra_cache.shape[1]
    else:  # unused placeholders
        extra_args, extra_len, page2 = (None, 0, 0, 1, None, 0, 0, None, 1), None, 1
    d_nope, d_rope = _dims(fmt, d)
    grid = (triton.cdiv(rows, cfg.block_m), axis1, parts)
    use_tma = cfg.tma and _tma_ok(cache, fmt, page, cfg.block_n, sparse)
    k_desc, r_desc = _descriptors(cache, cfg.block_n, d_nope, d_rope) if use_tma else (None, None)
    args = dict(zip(mla_attention_kernel.arg_names, (
        q4, q4.stride(0), q4.stride(1), q4.stride(2),
        out4, out4.stride(0), out4.stride(1), out4.stride(2),
        lse, *lse_strides, max_logits,
        o_acc, lse_acc, s_q * h_q, h_q, 1,
        cache_t, sp, sr, sh, pages, k_desc, r_desc,
        slots, *slot_strides, lengths, list_len,
        *extra_args, sink,
        plan.schedule.metadata if persistent else None,
        plan.schedule.num_splits if persistent else None,
        s_q, group, rows, scale * LOG2E,
    )))  # fmt: skip
    constexprs = dict(
        PAGE=page, PAGE2=page2, SPARSE=sparse, FMT=FMT_CODE[fmt], CAUSAL=causal,
        PERSISTENT=persistent, HAS_LENGTHS=lengths is not None, HAS_EXTRA=extra is not None,
        HAS_LENGTHS2=extra_len is not None, HAS_SINK=sink is not None,
        HAS_MAX_LOGITS=max_logits is not None, D_NOPE=d_nope, D_ROPE=d_rope, D_V=512,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, UPCAST=INTERPRET,
        FP8_HW=_fp8_hardware(q4.device), TRANS=cfg.trans,
        USE_TMA=use_tma,
    )  # fmt: skip
    device = q4.device.index or 0
    launches = [
        Launch(
            mla_attention_kernel,
            grid,
            {**args, **constexprs},
            cfg.num_warps,
            1,
            frozenset(constexprs),
            device,
        )
    ]
    if persistent:
        cargs = dict(zip(combine_kernel.arg_names, (
            o_acc, lse_acc, s_q * h_q, h_q, 1, plan.schedule.num_splits,
            out4, out4.stride(0), out4.stride(1), out4.stride(2),
            lse, *lse_strides, sink, s_q, h_q,
        )))  # fmt: skip
        cconst = dict(
            HAS_SINK=sink is not None, BLOCK_S=16, BLOCK_D=COMBINE_COLS, D_V=512, UPCAST=INTERPRET
        )
        grid = (b * s_q, h_q, 512 // COMBINE_COLS)
        launches.append(
            Launch(combine_kernel, grid, {**cargs, **cconst}, 4, 1, frozenset(cconst), device)
        )
    return launches


def _run(launches: list[Launch], tensors: dict[str, Tensor | None] | None = None) -> None:
    """Launch in order (templates with ``tensors`` in place of their own), on the tensors'
    device: Triton compiles and launches for the current one."""

    def launch_all() -> None:
        for launch in launches:
            if tensors is None:
                launch()
            else:
                launch.run_with(tensors)

    if INTERPRET or launches[0].device == torch.cuda.current_device():
        launch_all()
        return
    with torch.cuda.device(launches[0].device):
        launch_all()


def dense_decode_launches(
    p: DenseDecodeProblem, plan: DecodePlan, out: Tensor, lse: Tensor
) -> list[Launch]:
    rows, axis1, group = row_groups(p)
    return attention_launches(
        q4=p.q, out4=out, lse=lse, lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)),
        max_logits=None, cache=p.k_cache, fmt=p.cache_format, page=p.k_cache.shape[1],
        slots=p.block_table, slot_strides=(p.block_table.stride(0), 0), lengths=p.cache_seqlens,
        list_len=p.block_table.shape[1], extra=None, sink=None, plan=plan,
        num_requests=p.q.shape[0], rows=rows, axis1=axis1, group=group, sparse=False,
        causal=p.causal, scale=p.softmax_scale,
    )  # fmt: skip


def sparse_decode_launches(
    p: SparseDecodeProblem, plan: DecodePlan, out: Tensor, lse: Tensor
) -> list[Launch]:
    rows, axis1, group = row_groups(p)
    extra = None
    if p.extra_k_cache is not None:
        extra = (p.extra_k_cache, p.extra_indices, p.extra_topk_length)
    return attention_launches(
        q4=p.q, out4=out, lse=lse, lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)),
        max_logits=None, cache=p.k_cache, fmt=p.cache_format, page=p.k_cache.shape[1],
        slots=p.indices, slot_strides=(p.indices.stride(0), p.indices.stride(1)),
        lengths=p.topk_length, list_len=p.indices.shape[2], extra=extra, sink=p.attn_sink,
        plan=plan, num_requests=p.q.shape[0], rows=rows, axis1=axis1, group=group,
        sparse=True, causal=False, scale=p.softmax_scale,
    )  # fmt: skip


def sparse_prefill_launches(
    p: SparsePrefillProblem, out: Tensor, max_logits: Tensor, lse: Tensor
) -> list[Launch]:
    """Each query token is a one-token "request" over the bf16 ``kv`` seen as a paged cache of
    one-token pages (so flat slots are token indices and ``s_kv`` bounds them)."""
    s_q, h_q, _d = p.q.shape
    return attention_launches(
        q4=p.q.unsqueeze(1), out4=out.unsqueeze(1), lse=lse,
        lse_strides=(lse.stride(0), 0, lse.stride(1)), max_logits=max_logits,
        cache=p.kv.unsqueeze(1), fmt=CacheFormat.BF16, page=1,
        slots=p.indices, slot_strides=(p.indices.stride(0), 0), lengths=p.topk_length,
        list_len=p.indices.shape[2], extra=None, sink=p.attn_sink, plan=None,
        num_requests=s_q, rows=h_q, axis1=1, group=h_q, sparse=True, causal=False,
        scale=p.sm_scale,
    )  # fmt: skip


def _layout(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _run_templated(plan: DecodePlan, key: tuple, build, tensors: dict[str, Tensor | None]) -> None:
    """Run ``build()``'s launches, built once per plan and input layout (the layers of a
    decoding step share them) and relaunched with this call's tensors."""
    templates = plan.launches.get(key)
    if templates is None:
        templates = plan.launches[key] = [launch.template() for launch in build()]
        _run(templates)
        return
    k_desc = templates[0].args.get("k_desc")
    if k_desc is not None:  # descriptors point into this call's cache
        tensors["k_desc"], tensors["r_desc"] = _descriptors(
            tensors["cache"], *k_desc.block_shape, templates[0].args["D_ROPE"]
        )
    _run(templates, tensors)


def dense_decode(p: DenseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    out, lse = p.empty_outputs()
    if plan is None:  # a one-off call: nothing to reuse
        _run(dense_decode_launches(p, plan_dense_decode(p), out, lse))
        return out, lse
    key = (
        "dense",
        _layout(p.q),
        _layout(p.k_cache),
        _layout(p.block_table),
        p.softmax_scale,
        p.causal,
    )
    tensors = {
        "q": p.q, "out": out, "lse": lse, "cache": _cache_args(p.k_cache, p.cache_format)[0],
        "slots": p.block_table, "seqlens": p.cache_seqlens,
    }  # fmt: skip
    _run_templated(plan, key, lambda: dense_decode_launches(p, plan, out, lse), tensors)
    return out, lse


def sparse_decode(p: SparseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    out, lse = p.empty_outputs()
    if plan is None:  # a one-off call: nothing to reuse
        _run(sparse_decode_launches(p, plan_sparse_decode(p), out, lse))
        return out, lse
    key = (
        "sparse", _layout(p.q), _layout(p.k_cache), _layout(p.indices), _layout(p.topk_length),
        _layout(p.attn_sink), _layout(p.extra_k_cache), _layout(p.extra_indices),
        _layout(p.extra_topk_length), p.softmax_scale,
    )  # fmt: skip
    tensors = {
        "q": p.q, "out": out, "lse": lse, "cache": _cache_args(p.k_cache, p.cache_format)[0],
        "slots": p.indices, "seqlens": p.topk_length, "sink": p.attn_sink,
    }  # fmt: skip
    if p.extra_k_cache is not None:
        tensors["cache2"] = _cache_args(p.extra_k_cache, p.cache_format)[0]
        tensors["slots2"], tensors["seqlens2"] = p.extra_indices, p.extra_topk_length
    _run_templated(plan, key, lambda: sparse_decode_launches(p, plan, out, lse), tensors)
    return out, lse


def sparse_prefill(p: SparsePrefillProblem) -> tuple[Tensor, Tensor, Tensor]:
    out, max_logits, lse = p.empty_outputs()
    _run(sparse_prefill_launches(p, out, max_logits, lse))
    return out, max_logits, lse
