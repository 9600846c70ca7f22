"""Tests of the split-KV scheduler, its metadata and the combine step (contract §1.1, §6)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashmla
from flashmla import scheduler as S

LOG2E = 1.4426950408889634
N = 64

# --------------------------------------------------------------------------------------------
# An independent, pure-Python transcription of the greedy of §6.1


def greedy_reference(lengths: list[int], parts: int, overhead: int = 5, block: int = N):
    """Returns (rows, num_splits); an idle part's row is ``("idle", begin_req)``."""
    b = len(lengths)
    n = [max(length - 1, 0) // block + 1 for length in lengths]
    total = sum(x + overhead for x in n)
    payload = -(-total // parts) + overhead
    num_splits = [0] * (b + 1)
    rows = []
    r = k = s = 0
    for _ in range(parts):
        budget = payload
        begin_req, begin_blk, begin_split = r, k, s
        while r < b:
            remaining = n[r] - k
            if budget >= remaining + overhead:
                budget -= remaining + overhead
                num_splits[r + 1] = num_splits[r] + s + 1
                r, k, s = r + 1, 0, 0
            else:
                if budget - overhead > 0:
                    k += budget - overhead
                    s += 1
                break
        if begin_req >= b:
            rows.append(("idle", begin_req))
            continue
        end_req = r if k > 0 else r - 1
        end_blk = k if k > 0 else (0 if lengths[r - 1] == 0 else n[r - 1])
        first = begin_blk != 0
        last = end_blk != n[end_req] and lengths[end_req] != 0
        if begin_req == end_req:
            first = last = first or last
        rows.append([begin_req, end_req, begin_blk, end_blk, begin_split, int(first), int(last), 0])
    return rows, num_splits


def schedule(lengths: list[int], parts: int, overhead: int = 5) -> S.Schedule:
    return S.split_kv_schedule(torch.tensor(lengths, dtype=torch.int32), parts, overhead=overhead)


# --------------------------------------------------------------------------------------------
# The worked example of §6.1


def test_worked_example():
    sched = schedule([1000, 64], 4)
    assert sched.metadata.dtype == torch.int32 and sched.num_splits.dtype == torch.int32
    # n = [16, 1], total = 27, payload = ceil(27/4) + 5 = 12
    assert sched.metadata.tolist() == [
        [0, 0, 0, 7, 0, 1, 1, 0],  # 12 - 5 = 7 blocks of request 0, split
        [0, 0, 7, 14, 1, 1, 1, 0],  # 7 more
        [0, 0, 14, 16, 2, 1, 1, 0],  # the last 2 (cost 7), then 5 left: not enough for req 1
        [1, 1, 0, 1, 0, 0, 0, 0],  # request 1 whole
    ]
    assert sched.num_splits.tolist() == [0, 3, 4]
    assert S.schedule_pieces(sched) == [(0, 0, 7, 0), (0, 7, 14, 1), (0, 14, 16, 2), (1, 0, 1, 3)]


def test_idle_parts_and_zero_lengths():
    sched = schedule([0], 3)  # n = [1], total 6, payload 7: part 0 does everything
    md = sched.metadata.tolist()
    assert md[0] == [0, 0, 0, 0, 0, 0, 0, 0]  # a zero-length request ends at block 0, unsplit
    assert [row[0] for row in md[1:]] == [1, 1]  # idle parts start at b
    assert sched.num_splits.tolist() == [0, 1]

    sched = schedule([0, 130, 0], 2)  # n = [1, 3, 1], total 20, payload 15
    assert sched.metadata.tolist() == [
        [0, 1, 0, 3, 0, 0, 0, 0],  # 6 + 8 = 14 <= 15; then 1 left
        [2, 2, 0, 0, 0, 0, 0, 0],
    ]
    assert sched.num_splits.tolist() == [0, 1, 2, 3]


def test_single_part_takes_everything():
    sched = schedule([5, 6000, 0, 64, 65], 1)
    assert sched.metadata.tolist() == [[0, 4, 0, 2, 0, 0, 0, 0]]
    assert sched.num_splits.tolist() == [0, 1, 2, 3, 4, 5]


def test_overhead_three():
    # SM100 head128 uses F = 3. n = [10], total 13, P = 3: payload 5 + 3 = 8 -> pieces of 5, 5
    sched = schedule([640], 3, overhead=3)
    assert sched.metadata[:2].tolist() == [
        [0, 0, 0, 5, 0, 1, 1, 0],
        [0, 0, 5, 10, 1, 1, 1, 0],
    ]
    assert sched.metadata[2, 0] == 1  # idle
    assert sched.num_splits.tolist() == [0, 2]


# --------------------------------------------------------------------------------------------
# Properties over random lengths and part counts

lengths_st = st.lists(
    st.one_of(
        st.just(0),
        st.integers(1, 130),
        st.sampled_from([63, 64, 65, 127, 128, 129]),
        st.integers(131, 4000),
    ),
    min_size=1,
    max_size=10,
)
PROPS = settings(max_examples=150, deadline=None, database=None)


@PROPS
@given(lengths=lengths_st, parts=st.integers(1, 40), overhead=st.sampled_from([5, 3]))
def test_schedule_properties(lengths, parts, overhead):
    sched = schedule(lengths, parts, overhead)
    b = len(lengths)
    md, ns = sched.metadata, sched.num_splits
    assert md.dtype == torch.int32 and md.shape == (parts, 8)
    assert ns.dtype == torch.int32 and ns.shape == (b + 1,)
    md, ns = md.tolist(), ns.tolist()
    n = [max(length - 1, 0) // N + 1 for length in lengths]
    real = [math.ceil(length / N) for length in lengths]
    payload = -(-sum(x + overhead for x in n) // parts) + overhead

    pieces = S.schedule_pieces(sched)
    by_req: dict[int, list[tuple[int, int, int]]] = {r: [] for r in range(b)}
    for r, first, last, slot in pieces:
        by_req[r].append((first, n[r] if last is None else last, slot))

    for r in range(b):
        ps = by_req[r]
        assert ps, f"request {r} has no piece"
        # num_splits is the prefix sum of per-request piece counts
        assert ns[r + 1] - ns[r] == len(ps)
        # pieces in order, contiguous, consecutive accumulator slots
        assert ps[0][0] == 0
        for (_, end, slot), (nxt, _, nslot) in itertools.pairwise(ps):
            assert end == nxt and nslot == slot + 1
        assert [p[2] for p in ps] == list(range(ns[r], ns[r + 1]))
        # every real KV block covered exactly once
        covered = [0] * real[r]
        for first, end, _ in ps:
            for blk in range(first, min(end, real[r])):
                covered[blk] += 1
        assert covered == [1] * real[r]
        if lengths[r] > 0:
            assert ps[-1][1] == n[r]
        else:  # one piece; it ends at block 0 when the request closes its part
            assert len(ps) == 1 and ps[0][1] in (0, 1)
    assert ns[0] == 0 and ns[-1] == len(pieces)

    seen_idle = False
    for row in md:
        begin_req, end_req, begin_blk, end_blk, split, first, last, pad = row
        assert pad == 0
        if begin_req >= b:
            assert begin_req == b
            seen_idle = True
            continue
        assert not seen_idle, "a working part after an idle one"
        assert begin_req <= end_req < b
        # flags: the first / last request of the part is cut into several pieces
        assert first == int(ns[begin_req + 1] - ns[begin_req] > 1)
        assert last == int(ns[end_req + 1] - ns[end_req] > 1)
        assert 0 <= split < ns[begin_req + 1] - ns[begin_req]
        # the part's cost fits its budget
        cost = 0
        for r in range(begin_req, end_req + 1):
            lo = begin_blk if r == begin_req else 0
            hi = end_blk if r == end_req else n[r]
            cost += max(hi - lo, 1 if lengths[r] == 0 else 0) + overhead
        assert cost <= payload


@PROPS
@given(lengths=lengths_st, parts=st.integers(1, 40), overhead=st.sampled_from([5, 3]))
def test_schedule_matches_reference_greedy(lengths, parts, overhead):
    sched = schedule(lengths, parts, overhead)
    rows, num_splits = greedy_reference(lengths, parts, overhead)
    assert sched.num_splits.tolist() == num_splits
    for got, want in zip(sched.metadata.tolist(), rows, strict=True):
        if want[0] == "idle":
            assert got[0] == want[1] == len(lengths)  # idle rows: only begin_req is defined
        else:
            assert got == want


def test_schedule_reads_lengths_of_any_int_dtype():
    a = S.split_kv_schedule(torch.tensor([700, 3, 0, 129], dtype=torch.int64), 5)
    b = schedule([700, 3, 0, 129], 5)
    assert torch.equal(a.metadata, b.metadata) and torch.equal(a.num_splits, b.num_splits)


def test_sparse_lengths():
    tl = torch.tensor([0, 5, 64, 65], dtype=torch.int32)
    got = S.sparse_lengths(2048, tl, None, None, 4, torch.device("cpu"))
    assert got.tolist() == [1, 5, 64, 65]  # 0 counts as 1
    got = S.sparse_lengths(2048, None, None, None, 3, torch.device("cpu"))
    assert got.tolist() == [2048] * 3
    got = S.sparse_lengths(2048, tl, 128, None, 4, torch.device("cpu"))
    assert got.tolist() == [192, 192, 192, 256]  # roundup(L, 64) + extra_topk
    etl = torch.tensor([0, 10, 64, 1], dtype=torch.int32)
    got = S.sparse_lengths(2048, tl, 128, etl, 4, torch.device("cpu"))
    assert got.tolist() == [64, 74, 128, 129]
    got = S.sparse_lengths(100, None, 64, etl, 4, torch.device("cpu"))
    assert got.tolist() == [128, 138, 192, 129]


# --------------------------------------------------------------------------------------------
# Part counts and get_mla_metadata


def test_dense_num_parts():
    assert S.dense_num_parts(132, 1 * 128 // 1, 1) == 66
    assert S.dense_num_parts(132, 2 * 128 // 1, 1) == 33
    assert S.dense_num_parts(132, 4 * 128 // 1, 1) == 16
    assert S.dense_num_parts(132, 1 * 64 // 8, 8) == 16  # 8 rows per KV head -> one tile
    assert S.dense_num_parts(132, 1 * 126 // 2, 2) == 66  # ceil(63 / 64) = 1
    assert S.dense_num_parts(132, 3 * 63 // 3, 3) == 44  # 63 rows: 132 // 3 // 1
    assert S.dense_num_parts(132, 65, 1) == 66  # ceil(65 / 64) = 2
    assert S.dense_num_parts(1, 128, 1) == 1  # never below one part


def test_sparse_num_parts():
    assert S.sparse_num_parts(132, 1, 128) == 66
    assert S.sparse_num_parts(132, 2, 128) == 33
    assert S.sparse_num_parts(132, 1, 64) == 132
    assert S.sparse_num_parts(132, 2, 64) == 66
    assert S.sparse_num_parts(132, 200, 64) == 1


def test_get_mla_metadata_new_form():
    meta, none = flashmla.get_mla_metadata()
    assert none is None
    assert isinstance(meta, flashmla.SchedMeta) and isinstance(meta, flashmla.FlashMLASchedMeta)
    assert meta.have_initialized is False and meta.config is None
    assert meta.tile_scheduler_metadata is None and meta.num_splits is None
    assert flashmla.get_mla_metadata()[0] is not meta  # one fresh object per call


@pytest.mark.parametrize(
    ("s_q", "h_q", "h_kv", "parts"),
    [(1, 128, 1, 66), (2, 128, 1, 33), (1, 64, 2, 66), (4, 16, 1, 132)],
)
def test_get_mla_metadata_old_form(s_q, h_q, h_kv, parts):
    seqlens = torch.tensor([4096, 0, 17, 1000, 65], dtype=torch.int32)
    md, ns = flashmla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    assert md.dtype == torch.int32 and ns.dtype == torch.int32
    assert md.shape == (parts, 8) and ns.shape == (6,)
    assert md.is_contiguous() and ns.is_contiguous()
    ref = S.split_kv_schedule(seqlens, parts)
    assert torch.equal(md, ref.metadata) and torch.equal(ns, ref.num_splits)


@pytest.mark.parametrize(("h_q", "s_q", "parts"), [(128, 1, 66), (128, 2, 33), (64, 1, 132)])
def test_get_mla_metadata_old_sparse_form(h_q, s_q, parts):
    seqlens = torch.tensor([4096, 10], dtype=torch.int32)
    md, ns = flashmla.get_mla_metadata(
        seqlens, s_q * h_q, 1, num_heads_q=h_q, is_fp8_kvcache=True, topk=2048
    )
    assert md.shape == (parts, 8) and ns.shape == (3,)
    ref = S.split_kv_schedule(torch.tensor([2048, 2048]), parts)  # sparse work = topk per request
    assert torch.equal(md, ref.metadata) and torch.equal(ns, ref.num_splits)


def test_get_mla_metadata_old_form_errors():
    with pytest.raises(flashmla.InvalidArgumentError):
        flashmla.get_mla_metadata(torch.tensor([5], dtype=torch.int32), 0, 1)
    with pytest.raises(flashmla.DTypeError):
        flashmla.get_mla_metadata(torch.tensor([5], dtype=torch.int64), 128, 1)
    with pytest.raises(flashmla.InvalidArgumentError):  # sparse needs num_heads_q
        flashmla.get_mla_metadata(torch.tensor([5], dtype=torch.int32), 128, 1, topk=64)


# --------------------------------------------------------------------------------------------
# combine_splits


def _attention(q, k, v, scale, visible):
    """float64 softmax attention over the keys where ``visible``; (out, natural lse)."""
    s = torch.einsum("thd,jd->thj", q, k) * scale
    s = s.masked_fill(~visible[:, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def _split_problem(lengths, parts, s_q=2, h=3, d=8, dv=6, seed=0, causal=False, spread=1.0):
    """A real attention split along the schedule. Returns (accumulators, num_splits, reference
    out [b, s_q, h, dv], reference natural lse [b, s_q, h]), all from float64 math."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    sched = S.split_kv_schedule(torch.tensor(lengths, dtype=torch.int32), parts)
    ns = sched.num_splits
    slots = b + parts
    # unused accumulator slots hold garbage that must be ignored
    o_acc = torch.full((slots, s_q, h, dv), math.nan, dtype=torch.float32)
    l_acc = torch.full((slots, s_q, h), 100.0, dtype=torch.float32)
    ref_out = torch.zeros(b, s_q, h, dv, dtype=torch.float64)
    ref_lse = torch.full((b, s_q, h), math.inf, dtype=torch.float64)
    keys, vals, queries = [], [], []
    for r, length in enumerate(lengths):
        q = torch.randn(s_q, h, d, generator=g, dtype=torch.float64) * spread
        k = torch.randn(length, d, generator=g, dtype=torch.float64)
        v = torch.randn(length, dv, generator=g, dtype=torch.float64)
        pos = torch.arange(length)
        if causal:
            visible = pos[None, :] <= length - s_q + torch.arange(s_q)[:, None]
        else:
            visible = torch.ones(s_q, length, dtype=torch.bool)
        out, lse = _attention(q, k, v, 0.3, visible)
        ref_out[r] = out
        ref_lse[r] = torch.where(torch.isinf(lse), math.inf, lse)  # empty rows: +inf
        queries.append((q, visible))
        keys.append(k)
        vals.append(v)
    for r, first, last, slot in S.schedule_pieces(sched):
        q, visible = queries[r]
        lo = first * N
        hi = len(visible[0]) if last is None else min(last * N, len(visible[0]))
        hi = max(hi, lo)
        vis = visible.clone()
        vis[:, :lo] = False
        vis[:, hi:] = False
        out, lse = _attention(q, keys[r], vals[r], 0.3, vis)
        o_acc[slot] = out.float()  # an empty piece's output is 0
        l_acc[slot] = (lse * LOG2E).float()  # base 2, -inf when empty
    return o_acc, l_acc, ns, ref_out, ref_lse


def _check(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.all(lse[torch.isinf(lse)] > 0)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("lengths", "parts", "causal"),
    [
        ([1000, 64], 4, False),
        ([700, 0, 333, 1, 64, 0], 7, False),
        ([0, 0], 3, False),
        ([900, 130, 2, 1], 9, True),  # causal: rows of short requests see nothing
    ],
)
def test_combine_matches_unsplit_attention(lengths, parts, causal):
    o_acc, l_acc, ns, ref_out, ref_lse = _split_problem(lengths, parts, causal=causal, seed=parts)
    if any(lengths):
        assert ns[-1] > len(lengths)  # something is actually split
    out, lse = S.combine_splits(o_acc, l_acc, ns, out_dtype=torch.float32)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    _check(out, lse, ref_out, ref_lse)
    # empty requests / rows: zero output and +inf lse
    empty = torch.isinf(ref_lse)
    if causal or 0 in lengths:
        assert empty.any()
    assert torch.all(out[empty] == 0)


@settings(max_examples=40, deadline=None, database=None)
@given(lengths=lengths_st.map(lambda xs: [min(x, 900) for x in xs]), parts=st.integers(1, 24))
def test_combine_property(lengths, parts):
    o_acc, l_acc, ns, ref_out, ref_lse = _split_problem(
        lengths, parts, s_q=1, h=2, seed=len(lengths)
    )
    out, lse = S.combine_splits(o_acc, l_acc, ns, out_dtype=torch.float32)
    _check(out, lse, ref_out, ref_lse)


def test_combine_is_stable_for_large_logits():
    # logits of several hundred: 2^lse overflows float32 unless the max is subtracted
    o_acc, l_acc, ns, ref_out, ref_lse = _split_problem([800, 300], 6, spread=40.0, seed=3)
    assert l_acc[: int(ns[-1])].abs().max() > 200
    out, lse = S.combine_splits(o_acc, l_acc, ns, out_dtype=torch.float32)
    _check(out, lse, ref_out, ref_lse)


def test_combine_hand_example():
    o = torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])[:, None, :]  # [slots, rows=1, dv=2]
    l2 = torch.tensor([[1.0], [1.0], [-math.inf]])  # third piece empty
    ns = torch.tensor([0, 3], dtype=torch.int32)
    out, lse = S.combine_splits(o, l2, ns, out_dtype=torch.float32)
    # G = log2(2^1 + 2^1) = 2, weights 1/2, the empty piece weighs 0
    assert lse[0, 0].item() == pytest.approx(2.0 / LOG2E)
    assert out[0, 0].tolist() == pytest.approx([0.5, 1.5])
    # sink = 2 ln 2 (natural): G' = 2 + log2(1 + 2^(2 - 2)) = 3, weights 1/4; lse unchanged
    out, lse = S.combine_splits(o, l2, ns, torch.tensor([2.0 / LOG2E]), out_dtype=torch.float32)
    assert lse[0, 0].item() == pytest.approx(2.0 / LOG2E)
    assert out[0, 0].tolist() == pytest.approx([0.25, 0.75])


def test_combine_output_dtype_defaults_to_bf16():
    o_acc, l_acc, ns, ref_out, _ = _split_problem([300, 100], 3)
    out, lse = S.combine_splits(o_acc, l_acc, ns)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_combine_with_attn_sink(causal):
    lengths = [700, 0, 129, 3]
    h = 6
    o_acc, l_acc, ns, ref_out, ref_lse = _split_problem(
        lengths, 8, s_q=3, h=h, causal=causal, seed=11
    )
    sink = torch.tensor([0.7, -math.inf, math.inf, 40.0, -3.0, 1e4], dtype=torch.float32)
    out, lse = S.combine_splits(o_acc, l_acc, ns, sink, out_dtype=torch.float32)
    # lse is sink-free
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~fin)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=1e-6, atol=1e-5)
    # out = o / (1 + exp(sink - lse)); rows without keys stay 0 whatever the sink
    factor = 1.0 / (1.0 + torch.exp(sink.double() - ref_lse))
    factor = torch.where(fin, factor, 0.0)
    want = ref_out * factor[..., None]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(out[:, :, 2] == 0)  # +inf sink zeroes everything
    unsunk = _split_free(o_acc, l_acc, ns)
    assert torch.equal(out[:, :, 1], unsunk[:, :, 1])  # -inf sink changes nothing
    assert torch.all(out[1] == 0)  # the empty request
    assert not torch.isnan(out).any()


def _split_free(o_acc, l_acc, ns):
    return S.combine_splits(o_acc, l_acc, ns, out_dtype=torch.float32)[0]
