"""Split-KV scheduling for decode (contract §6) and the combine step's math.

A decode call has ``b`` requests of very different lengths but the GPU has a fixed number of SMs.
The scheduler cuts the requests' KV blocks into ``num_parts`` contiguous pieces of similar cost
(each piece pays a fixed overhead ``F`` on top of its blocks); a kernel runs one CTA per part, a
request cut into several pieces gets one partial result per piece, and the combine step merges
them with their log-sum-exps.

Everything here is made of torch ops on the tensors' own device: no host synchronisation, so a
CUDA graph can capture it and replays follow new ``cache_seqlens``. This is the reference
scheduler; a GPU backend may run the same algorithm as one kernel (it is sequential by nature).

Metadata row (int32 x 8) per part::

    [begin_req, end_req (inclusive), begin_block, end_block (exclusive; of end_req),
     begin_split (index of the part's first piece within begin_req), is_first_req_split,
     is_last_req_split, 0]

``num_splits`` is ``[b + 1]``: request i's pieces are accumulator slots
``num_splits[i] .. num_splits[i+1] - 1``.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, field
from typing import Any, NamedTuple

import torch

BLOCK_TOKENS = 64
OVERHEAD_BLOCKS = 5
LOG2E = 1.4426950408889634
DEFAULT_NUM_SMS = 132  # Hopper's count; used to shape metadata for CPU tensors


class Schedule(NamedTuple):
    """A split-KV schedule: ``metadata[num_parts, 8]`` and ``num_splits[b + 1]`` (int32)."""

    metadata: torch.Tensor
    num_splits: torch.Tensor


@dataclass(frozen=True)
class DecodeConfig:
    """What a :class:`SchedMeta` was first used with; later calls must match it exactly."""

    b: int
    s_q: int
    h_q: int
    page_block_size: int
    h_k: int
    causal: bool
    is_fp8_kvcache: bool
    topk: int | None
    extra_page_block_size: int | None
    extra_topk: int | None


@dataclass
class SchedMeta:
    """FlashMLA's lazily initialised scheduling object (``FlashMLASchedMeta``).

    ``get_mla_metadata()`` returns a fresh one; the first decode call that receives it records
    its :class:`DecodeConfig` and stores the backend's schedule in it, later calls reuse the
    schedule. Use one object per decoding step, shared by all layers; create it inside a CUDA
    graph capture if the graph must reschedule on replay.
    """

    have_initialized: bool = False
    config: DecodeConfig | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None
    plans: dict[str, Any] = field(default_factory=dict)

    @property
    def config_key(self) -> tuple | None:
        """The recorded config as a plain tuple (what each call compares against)."""
        if self.config is None:
            return None
        key = self.__dict__.get("_config_key")
        if key is None or key[0] is not self.config:
            key = self.__dict__["_config_key"] = (self.config, astuple(self.config))
        return key[1]


@dataclass(frozen=True)
class DecodePlan:
    """A decode call's split-KV schedule and the fp32 accumulators its split requests write
    (what a GPU backend's ``plan_*_decode`` returns). A SchedMeta keeps one per step for all
    layers: their calls run one after another on a stream, so they share the accumulators.
    ``launches`` is the backend's cache of prepared launches by input layout."""

    schedule: Schedule
    o_acc: torch.Tensor  # [b + parts, s_q, h_q, dv] partial outputs, normalised
    lse_acc: torch.Tensor  # [b + parts, s_q, h_q] partial base-2 lse
    launches: dict[tuple, list] = field(default_factory=dict, compare=False)

    @staticmethod
    def of(q: torch.Tensor, schedule: Schedule, d_v: int = 512) -> DecodePlan:
        """Accumulators for queries ``q [b, s_q, h_q, d]``: one slot per request and part."""
        b, s_q, h_q, _ = q.shape
        slots = b + schedule.metadata.shape[0]
        return DecodePlan(
            schedule,
            torch.empty((slots, s_q, h_q, d_v), dtype=torch.float32, device=q.device),
            torch.empty((slots, s_q, h_q), dtype=torch.float32, device=q.device),
        )


def device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def dense_num_parts(num_sms: int, rows_per_kv_head: int, h_kv: int) -> int:
    """FlashMLA's SM90 dense-decode part count: one CTA per 64 query rows (``s_q * h_q / h_kv``)
    of a KV head."""
    return max(num_sms // h_kv // math.ceil(rows_per_kv_head / 64), 1)


def sparse_num_parts(num_sms: int, s_q: int, h_q: int) -> int:
    """FlashMLA's SM90 sparse-decode part count (one CTA per 64 heads and query token)."""
    return max(num_sms // s_q // math.ceil(h_q / 64), 1)


def sparse_lengths(
    topk: int,
    topk_length: torch.Tensor | None,
    extra_topk: int | None,
    extra_topk_length: torch.Tensor | None,
    b: int,
    device: torch.device,
) -> torch.Tensor:
    """Per-request work of a sparse decode in index entries (§6.1 step 1)."""
    if topk_length is not None:
        lengths = topk_length.to(torch.int64).clamp(min=1)
    else:
        lengths = torch.full((b,), topk, dtype=torch.int64, device=device)
    if extra_topk is not None:
        lengths = (lengths + 63) // 64 * 64
        if extra_topk_length is not None:
            lengths = lengths + extra_topk_length.to(torch.int64)
        else:
            lengths = lengths + extra_topk
    return lengths


def split_kv_schedule(
    lengths: torch.Tensor,
    num_parts: int,
    block: int = BLOCK_TOKENS,
    overhead: int = OVERHEAD_BLOCKS,
) -> Schedule:
    """FlashMLA's greedy split (§6.1) of requests with ``lengths[b]`` tokens into parts.

    Each part gets a budget of ``ceil(total / num_parts) + overhead`` where ``total`` counts
    every request's blocks plus one overhead each; a part finishes requests while its budget
    allows and takes ``budget - overhead`` blocks of the next one when that is positive.
    """
    device = lengths.device
    lengths = lengths.to(torch.int64)
    b = lengths.shape[0]
    blocks = torch.clamp(lengths - 1, min=0) // block + 1
    prefix = torch.zeros(b + 1, dtype=torch.int64, device=device)
    prefix[1:] = torch.cumsum(blocks + overhead, 0)
    budget = (prefix[-1] + num_parts - 1) // num_parts + overhead

    # blocks[b] / lengths[b] are sentinels so that index b (past the last request) is legal.
    blocks_ext = torch.cat([blocks, blocks.new_ones(1)])
    lengths_ext = torch.cat([lengths, lengths.new_zeros(1)])
    req = torch.zeros((), dtype=torch.int64, device=device)
    blk = torch.zeros_like(req)
    split = torch.zeros_like(req)
    pieces = torch.zeros(b + 1, dtype=torch.int64, device=device)
    rows = []
    ar = torch.arange(b + 1, device=device)
    for _ in range(num_parts):
        begin = (req, blk, split)
        # Requests begin..j-1 finish inside this part.
        spent_to = prefix[req] + blk + budget
        j = torch.maximum(torch.searchsorted(prefix, spent_to, right=True) - 1, req)
        finished = (ar >= req) & (ar < j)
        pieces = torch.where(finished, 1 + torch.where(ar == req, split, 0), pieces)
        same = j == req
        leftover = budget - torch.where(same, 0, prefix[j] - prefix[req] - blk)
        partial = (j < b) & (leftover - overhead > 0)
        carry_blk = torch.where(same, blk, 0)
        carry_split = torch.where(same, split, 0)
        blk = torch.where(partial, carry_blk + leftover - overhead, carry_blk)
        split = torch.where(partial, carry_split + 1, carry_split)
        req = j
        rows.append(_part_row(begin, (req, blk), blocks_ext, lengths_ext, b))
    num_splits = torch.zeros(b + 1, dtype=torch.int32, device=device)
    num_splits[1:] = torch.cumsum(pieces[:b], 0).to(torch.int32)
    return Schedule(torch.stack(rows).to(torch.int32), num_splits)


def _part_row(begin, end, blocks, lengths, b) -> torch.Tensor:
    begin_req, begin_blk, begin_split = begin
    req, blk = end
    prev = torch.clamp(req - 1, min=0)
    ends_inside = blk > 0
    end_req = torch.where(ends_inside, req, req - 1)
    end_blk = torch.where(ends_inside, blk, torch.where(lengths[prev] == 0, 0, blocks[prev]))
    end_req_c = torch.clamp(end_req, min=0)
    first_split = begin_blk != 0
    last_split = (end_blk != blocks[end_req_c]) & (lengths[end_req_c] != 0)
    single = begin_req == end_req
    either = first_split | last_split
    first_split = torch.where(single, either, first_split)
    last_split = torch.where(single, either, last_split)
    idle = begin_req >= b
    end_req = torch.where(idle, begin_req - 1, end_req)
    zero = torch.zeros_like(begin_req)
    fields = [
        begin_req,
        end_req,
        torch.where(idle, zero, begin_blk),
        torch.where(idle, zero, end_blk),
        torch.where(idle, zero, begin_split),
        torch.where(idle, zero, first_split.long()),
        torch.where(idle, zero, last_split.long()),
        zero,
    ]
    return torch.stack(fields)


def schedule_pieces(schedule: Schedule) -> list[tuple[int, int, int, int]]:
    """Host-side decoding of a schedule into ``(request, first_block, end_block, slot)`` pieces,
    in part order. For tests and debugging (it synchronises)."""
    md = schedule.metadata.tolist()
    ns = schedule.num_splits.tolist()
    b = len(ns) - 1
    out = []
    for begin_req, end_req, begin_blk, end_blk, split, *_ in md:
        if begin_req >= b:
            continue
        for r in range(begin_req, end_req + 1):
            first = begin_blk if r == begin_req else 0
            s = split if r == begin_req else 0
            last = end_blk if r == end_req else None
            out.append((r, first, last, ns[r] + s))
    return out


# --------------------------------------------------------------------------------------------
# Combine


def combine_splits(
    out_accum: torch.Tensor,
    lse_accum: torch.Tensor,
    num_splits: torch.Tensor,
    attn_sink: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-piece results into per-request results (§6.3).

    ``out_accum[slots, rows..., dv]`` holds each piece's output normalised by its own row sum,
    ``lse_accum[slots, rows...]`` its log-sum-exp in **base 2** (``-inf`` for an empty piece);
    request i owns slots ``num_splits[i] .. num_splits[i+1]-1``. ``attn_sink`` (natural log,
    broadcast against the last row dim, i.e. per head) scales outputs by ``1/(1+exp(sink-lse))``.

    Returns ``out[b, rows..., dv]`` in ``out_dtype`` and the natural-log ``lse[b, rows...]``
    (``+inf`` for requests with no visible key; their output is 0).
    """
    b = num_splits.shape[0] - 1
    slots = lse_accum.shape[0]
    seg = (
        torch.searchsorted(
            num_splits.to(torch.int64), torch.arange(slots, device=lse_accum.device), right=True
        )
        - 1
    )
    seg = seg.clamp(0, b - 1)
    used = torch.arange(slots, device=lse_accum.device) < num_splits[-1].to(torch.int64)
    lse2 = torch.where(used.view(-1, *[1] * (lse_accum.dim() - 1)), lse_accum.float(), -math.inf)
    rows = lse2.shape[1:]
    seg_rows = seg.view(-1, *[1] * len(rows)).expand_as(lse2)
    m = torch.full((b, *rows), -math.inf, device=lse2.device)
    m = m.scatter_reduce(0, seg_rows, lse2, "amax", include_self=True)
    m = torch.where(torch.isinf(m) & (m < 0), 0.0, m)
    s = torch.zeros((b, *rows), device=lse2.device).scatter_add(
        0, seg_rows, torch.exp2(lse2 - m.gather(0, seg_rows))
    )
    g = torch.where(s > 0, torch.log2(s) + m, math.inf)
    lse = g / LOG2E
    g_sink = g
    if attn_sink is not None:
        sink2 = attn_sink.float() * LOG2E
        with_sink = g + torch.log2(1 + torch.exp2(sink2 - g))
        g_sink = torch.where(torch.isinf(g), sink2.expand_as(g), with_sink)
        g_sink = torch.where(torch.isinf(g) & (sink2 == -math.inf), math.inf, g_sink)
    w = torch.exp2(lse2 - g_sink.gather(0, seg_rows))
    w = torch.where(torch.isnan(w), 0.0, w)
    contrib = torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * out_accum.float(), 0.0)
    out = torch.zeros((b, *out_accum.shape[1:]), device=out_accum.device)
    out = out.index_add(0, seg.masked_fill(~used, 0), contrib * used.view(-1, *[1] * len(rows), 1))
    return out.to(out_dtype), lse
