"""Launchers of the split-KV schedule and combine kernels (``kernels/splitkv.cu``).

:func:`schedule` runs FlashMLA's greedy split (contract §6.1) on the GPU: it reads the lengths
on the device (no host synchronisation, so a CUDA graph that captures it reschedules on replay)
and produces exactly what :func:`flashmla.scheduler.split_kv_schedule` does. :func:`combine`
merges the pieces of split requests (§6.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashmla.scheduler import OVERHEAD_BLOCKS, Schedule

from .compiler import Build
from .launch import I32, I64, PTR, Launch, kernel, pack, ptr, struct_type

D_V = 512
SCHED_THREADS = 256  # the kernel's default SCHED_THREADS
COMBINE_WARPS = 8  # warps per combine CTA: 8 / W heads, W warps each (combine_piece_warps)
COMBINE_COLS = 128  # output columns per combine warp (grid.z covers the 512)
COMBINE_UNROLL = 8  # pieces whose partials a warp loads at once (the kernel's COMBINE_UNROLL)

SCHEDULE_PARAMS = struct_type(
    [(name, PTR) for name in ("lengths", "extra_lengths", "metadata", "num_splits")]
    + [(name, I32) for name in (
        "b", "num_parts", "sparse", "topk", "has_extra", "extra_topk", "overhead",
    )]
)  # fmt: skip

COMBINE_PARAMS = struct_type(
    [(name, PTR) for name in ("o_acc", "lse_acc", "num_splits", "out", "lse", "sink")]
    + [(name, I64) for name in ("out_sb", "out_st", "out_sh", "lse_sb", "lse_st", "lse_sh")]
    + [("s_q", I32), ("h_q", I32), ("piece_warps", I32)]
)


def _build(fp16: bool) -> Build:
    return Build.of("splitkv.cu", DTYPE_FP16=fp16)


def builds(cc: tuple[int, int]) -> list[Build]:
    """Every compiled variant (the same on every ``cc``): combine per output dtype; the
    schedule kernel is taken from the bf16 one."""
    return [_build(False), _build(True)]


def _int32(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` as contiguous int32 on ``device`` (no copy when it already is)."""
    if t is None:
        return None
    return t.to(device=device, dtype=torch.int32).contiguous()


def schedule(
    *,
    b: int,
    num_parts: int,
    device: torch.device,
    seqlens: Tensor | None = None,
    topk: int = 0,
    topk_length: Tensor | None = None,
    extra_topk: int | None = None,
    extra_topk_length: Tensor | None = None,
) -> Schedule:
    """The split-KV schedule of ``b`` requests over ``num_parts`` parts: dense when ``seqlens``
    (``cache_seqlens [b]``) is given, else sparse, with lengths per §6.1 step 1
    (:func:`flashmla.scheduler.sparse_lengths`)."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    device = torch.device(device)
    metadata = torch.empty((num_parts, 8), dtype=torch.int32, device=device)
    num_splits = torch.empty((b + 1,), dtype=torch.int32, device=device)
    sparse = seqlens is None
    lengths = _int32(topk_length if sparse else seqlens, device)
    extra = _int32(extra_topk_length, device) if sparse else None
    # as sparse_lengths: the extra cache counts only when present (extra_topk given)
    has_extra = sparse and extra_topk is not None
    values = {
        "lengths": ptr(lengths),
        "extra_lengths": ptr(extra),
        "metadata": ptr(metadata),
        "num_splits": ptr(num_splits),
        "b": b,
        "num_parts": num_parts,
        "sparse": int(sparse),
        "topk": topk,
        "has_extra": int(has_extra),
        "extra_topk": extra_topk or 0,
        "overhead": OVERHEAD_BLOCKS,
    }
    with torch.cuda.device(device):
        k = kernel(_build(False), "schedule", device)
        k((1,), SCHED_THREADS, pack(SCHEDULE_PARAMS, values))
    return Schedule(metadata, num_splits)


def combine_piece_warps(slots: int, b: int) -> int:
    """W, the warps that share one head's pieces: enough for every warp to load about
    COMBINE_UNROLL pieces at once, from the mean pieces per request (slots / b), capped at the
    CTA's warps. (Any W gives the same result; it only sets how the work spreads.)"""
    w = 1
    while w < COMBINE_WARPS and 2 * w * COMBINE_UNROLL <= -(-slots // max(b, 1)):
        w *= 2
    return w


def combine(
    *,
    o_acc: Tensor,
    lse_acc: Tensor,
    num_splits: Tensor,
    out: Tensor,
    lse: Tensor,
    lse_strides: tuple[int, int, int],
    sink: Tensor | None,
) -> Launch:
    """Merge the pieces of every split request into ``out`` and the natural-log ``lse``; returns
    the launch (relaunch it with new ``out`` / ``lse`` / ``sink`` pointers).

    ``o_acc [slots, s_q, h_q, 512]`` / ``lse_acc [slots, s_q, h_q]`` (fp32, contiguous, base-2
    lse) hold the pieces; request i owns slots ``num_splits[i] .. num_splits[i+1]-1``. Requests
    with one piece are left alone (the attention kernel wrote them). ``lse_strides`` are the
    element strides of ``lse`` for (request, query token, head); ``sink`` is fp32 ``[h_q]``
    (contiguous).
    """
    b = num_splits.shape[0] - 1
    slots, s_q, h_q, d_v = o_acc.shape
    if d_v != D_V or not (o_acc.is_contiguous() and lse_acc.is_contiguous()):
        raise ValueError("combine needs contiguous accumulators of 512-dim rows")
    if out.stride(3) != 1 or out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("combine writes bf16/fp16 outputs with unit last stride")
    if num_splits.dtype != torch.int32 or lse.dtype != torch.float32:
        raise ValueError("combine needs int32 num_splits and an fp32 lse")
    if sink is not None and (sink.dtype != torch.float32 or sink.stride(0) != 1):
        raise ValueError("combine needs a contiguous fp32 sink")
    values = {
        "o_acc": ptr(o_acc),
        "lse_acc": ptr(lse_acc),
        "num_splits": ptr(num_splits),
        "out": ptr(out),
        "lse": ptr(lse),
        "sink": ptr(sink),
        "out_sb": out.stride(0),
        "out_st": out.stride(1),
        "out_sh": out.stride(2),
        "lse_sb": lse_strides[0],
        "lse_st": lse_strides[1],
        "lse_sh": lse_strides[2],
        "s_q": s_q,
        "h_q": h_q,
        "piece_warps": combine_piece_warps(slots, b),
    }
    heads_per_cta = COMBINE_WARPS // values["piece_warps"]
    grid = (b * s_q, -(-h_q // heads_per_cta), D_V // COMBINE_COLS)
    k = kernel(_build(out.dtype == torch.float16), "combine", out.device)
    launch = Launch.of(k, grid, COMBINE_WARPS * 32, COMBINE_PARAMS, values)
    launch.run()
    return launch
