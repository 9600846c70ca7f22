"""FlashMLA's split-KV greedy (contract §6.1) as one sequential GPU program.

The algorithm is inherently sequential (each part starts where the previous one stopped), so a
single program walks it, as FlashMLA's one-warp metadata kernel does; it reads lengths from
device memory, so a CUDA graph that captures it reschedules on replay. It produces exactly what
:func:`flashmla.scheduler.split_kv_schedule` produces (tests compare them)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _length(lengths, topk_len, extra_len, r, topk, extra_topk,
            SPARSE: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr,
            HAS_EXTRA_LEN: tl.constexpr):  # fmt: skip
    """Scheduled length of request r (§6.1 step 1), in tokens / index entries."""
    if SPARSE:
        n = topk + r * 0
        if HAS_TOPK_LEN:
            n = tl.load(topk_len + r)
        n = tl.maximum(n, 1)
        if HAS_EXTRA:
            n = (n + 63) // 64 * 64
            if HAS_EXTRA_LEN:
                n += tl.load(extra_len + r)
            else:
                n += extra_topk
    else:
        n = tl.load(lengths + r)
    return n


@triton.jit
def schedule_kernel(
    lengths, topk_len, extra_len, b, topk, extra_topk, num_parts, metadata, num_splits,
    SPARSE: tl.constexpr, HAS_TOPK_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr,
    HAS_EXTRA_LEN: tl.constexpr, OVERHEAD: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # Pass 1: total cost = sum(blocks + overhead).
    total = 0
    for start in range(0, b, CHUNK):
        r = start + tl.arange(0, CHUNK)
        ok = r < b
        n = _length(
            lengths,
            topk_len,
            extra_len,
            tl.where(ok, r, 0),
            topk,
            extra_topk,
            SPARSE,
            HAS_TOPK_LEN,
            HAS_EXTRA,
            HAS_EXTRA_LEN,
        )
        blocks = tl.maximum(n - 1, 0) // 64 + 1
        total += tl.sum(tl.where(ok, blocks + OVERHEAD, 0))
    payload = (total + num_parts - 1) // num_parts + OVERHEAD

    # Pass 2: the greedy fill, one part after another.
    tl.store(num_splits, 0)
    req = 0
    blk = 0
    split = 0
    done_splits = 0  # num_splits[req]
    for part in range(num_parts):
        begin_req = req
        begin_blk = blk
        begin_split = split
        budget = payload
        going = req < b
        # Length and blocks of the request the part ends in (last one it finished, or the one
        # it took a piece of); every working part does one or the other.
        end_len = 0
        end_blocks = 0
        while going:
            n_req = _length(lengths, topk_len, extra_len, req, topk, extra_topk, SPARSE,
                            HAS_TOPK_LEN, HAS_EXTRA, HAS_EXTRA_LEN)  # fmt: skip
            blocks = tl.maximum(n_req - 1, 0) // 64 + 1
            need = blocks - blk + OVERHEAD
            if budget >= need:  # finish this request
                budget -= need
                done_splits += split + 1
                tl.store(num_splits + req + 1, done_splits)
                end_len = n_req
                end_blocks = blocks
                req += 1
                blk = 0
                split = 0
                going = req < b
            else:  # take what fits of it and stop
                if budget - OVERHEAD > 0:
                    blk += budget - OVERHEAD
                    split += 1
                    end_len = n_req
                    end_blocks = blocks
                going = False
        # The row; a part that starts past the last request is idle: [b, b - 1, 0, ...].
        end_req = tl.where(blk > 0, req, req - 1)
        end_blk = tl.where(blk > 0, blk, tl.where(end_len == 0, 0, end_blocks))
        first = begin_blk != 0
        last = (end_blk != end_blocks) & (end_len != 0)
        either = first | last
        idle = begin_req >= b
        single = begin_req == end_req
        row = metadata + part * 8
        tl.store(row, begin_req)
        tl.store(row + 1, tl.where(idle, b - 1, end_req))
        tl.store(row + 2, tl.where(idle, 0, begin_blk))
        tl.store(row + 3, tl.where(idle, 0, end_blk))
        tl.store(row + 4, tl.where(idle, 0, begin_split))
        tl.store(row + 5, tl.where(idle, 0, tl.where(single, either, first).to(tl.int32)))
        tl.store(row + 6, tl.where(idle, 0, tl.where(single, either, last).to(tl.int32)))
        tl.store(row + 7, 0)
