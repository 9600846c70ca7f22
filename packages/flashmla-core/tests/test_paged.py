"""Tests of the paged-cache helpers: allocation, block tables, cache writes, slots, footprint."""

from __future__ import annotations

import math

import pytest
import torch

import flashmla
from flashmla import formats as F
from flashmla import paged as P
from flashmla.formats import CacheFormat


def storage_bytes(cache: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())


# --------------------------------------------------------------------------------------------
# allocate_paged_cache


@pytest.mark.parametrize(
    ("fmt", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)], ids=["bf16", "fp16"]
)
def test_allocate_plain(fmt, dtype):
    cache = flashmla.allocate_paged_cache(5, 64, cache_format=fmt, h_kv=2, head_dim=576)
    assert cache.shape == (5, 64, 2, 576) and cache.dtype == dtype
    assert cache.is_contiguous() and torch.all(cache == 0)
    cache = flashmla.allocate_paged_cache(3, 7, cache_format=CacheFormat(fmt), head_dim=128)
    assert cache.shape == (3, 7, 1, 128) and cache.stride() == (7 * 128, 128, 128, 1)


@pytest.mark.parametrize(
    ("fmt", "width", "bsz", "align", "stride"),
    [
        ("fp8_v32", 656, 64, None, 64 * 656),
        ("fp8_v32", 656, 64, 576, 73 * 576),  # 41984 -> 42048
        ("fp8_v32", 656, 2, 576, 3 * 576),  # 1312 -> 1728
        ("fp8_model1", 584, 64, None, 64 * 584),
        ("fp8_model1", 584, 64, 576, 65 * 576),  # 37376 -> 37440
        ("fp8_model1", 584, 61, 576, 62 * 576),  # 35624 -> 35712
        ("fp8_model1", 584, 3, 576, 4 * 576),  # 1752 -> 2304
        ("fp8_model1", 584, 576, 576, 584 * 576),  # already a multiple
        ("fp8_model1", 584, 5, 1, 5 * 584),
        ("fp8_v32", 656, 1, 4096, 4096),
    ],
)
def test_allocate_fp8(fmt, width, bsz, align, stride):
    nb = 3
    cache = flashmla.allocate_paged_cache(nb, bsz, cache_format=fmt, page_align=align)
    assert cache.shape == (nb, bsz, 1, width)
    assert cache.dtype == torch.uint8
    assert cache.stride() == (stride, width, width, 1)
    raw = storage_bytes(cache)
    assert raw.numel() == nb * stride and torch.all(raw == 0)
    assert F.detect_cache_format("k", cache, True) is CacheFormat(fmt)


# --------------------------------------------------------------------------------------------
# make_block_table


def test_make_block_table_unshuffled():
    lengths = torch.tensor([0, 1, 64, 65, 200], dtype=torch.int32)
    table, num_blocks = flashmla.make_block_table(lengths, 64, shuffle=False)
    assert table.dtype == torch.int32 and num_blocks == 8
    assert table.tolist() == [
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [2, 3, 0, 0],
        [4, 5, 6, 7],
    ]


def test_make_block_table_shuffled_is_a_permutation():
    lengths = torch.tensor([130, 5, 0, 64, 1000], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    table, num_blocks = flashmla.make_block_table(lengths, 64, max_blocks_per_seq=20, generator=g)
    needed = [3, 1, 0, 1, 16]
    assert num_blocks == sum(needed) and table.shape == (5, 20)
    used = torch.cat([table[i, :n] for i, n in enumerate(needed)])
    assert sorted(used.tolist()) == list(range(num_blocks))
    for i, n in enumerate(needed):
        assert torch.all(table[i, n:] == 0)
    again, _ = flashmla.make_block_table(
        lengths, 64, max_blocks_per_seq=20, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(table, again)  # reproducible with a seeded generator


def test_make_block_table_all_empty():
    table, num_blocks = flashmla.make_block_table(torch.zeros(3, dtype=torch.int32), 64)
    assert num_blocks == 1 and table.shape == (3, 1) and torch.all(table == 0)


# --------------------------------------------------------------------------------------------
# slots_for_positions


def test_slots_for_positions():
    table = torch.tensor([[3, 1, -1], [0, 2, 5]], dtype=torch.int32)
    pos = torch.tensor([[0, 5, 8, 12, -1, 11, 7], [0, 5, 8, 12, -1, 11, 7]])
    got = flashmla.slots_for_positions(table, pos, 4)
    assert got.dtype == torch.int32 and got.shape == pos.shape
    assert got.tolist() == [
        [12, 5, -1, -1, -1, -1, 7],  # page -1 and positions >= 3 * 4 are invalid
        [0, 9, 20, -1, -1, 23, 11],
    ]
    one = flashmla.slots_for_positions(table, torch.tensor([6, 9]), 4)
    assert one.tolist() == [6, 21] and one.shape == (2,)
    three = flashmla.slots_for_positions(table, pos.view(2, 7, 1).expand(2, 7, 2), 4)
    assert three.shape == (2, 7, 2) and torch.equal(three[..., 0], got)
    assert torch.equal(three[..., 1], got)


def test_slots_match_block_table_layout():
    lengths = torch.tensor([70, 3, 0, 129], dtype=torch.int32)
    bsz = 16
    table, num_blocks = flashmla.make_block_table(
        lengths, bsz, generator=torch.Generator().manual_seed(1)
    )
    pos = torch.arange(int(lengths.max())).expand(4, -1)
    slots = flashmla.slots_for_positions(table, pos, bsz)
    live = []
    for i, n in enumerate(lengths.tolist()):
        for j in range(n):
            assert slots[i, j] == table[i, j // bsz] * bsz + j % bsz
            live.append(int(slots[i, j]))
    assert len(set(live)) == len(live) and min(live) >= 0 and max(live) < num_blocks * bsz


# --------------------------------------------------------------------------------------------
# write_kv_cache


def _values(n: int, d: int, dtype=torch.bfloat16, h_kv: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h_kv, d, generator=g).to(dtype)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_plain_skips_invalid_slots(dtype, slot_dtype):
    nb, bsz, h_kv, d = 3, 5, 2, 16
    cache = torch.randn(nb, bsz, h_kv, d).to(dtype)  # non-zero, so stray writes show
    before = cache.clone()
    values = _values(6, d, dtype, h_kv)
    slots = torch.tensor([4, -1, 14, 15, 100, 0], dtype=slot_dtype)
    flashmla.write_kv_cache(cache, values, slots)
    want = before.clone()
    for i, s in enumerate([4, None, 14, None, None, 0]):
        if s is not None:
            want[s // bsz, s % bsz] = values[i]
    assert torch.equal(cache, want)


@pytest.mark.parametrize(("fmt", "align"), [("fp8_v32", None), ("fp8_model1", 576)])
def test_write_fp8_skips_invalid_slots(fmt, align):
    nb, bsz = 3, 5
    fmt = CacheFormat(fmt)
    d = fmt.head_dim
    cache = flashmla.allocate_paged_cache(nb, bsz, cache_format=fmt, page_align=align)
    raw = storage_bytes(cache)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=torch.Generator().manual_seed(2)))
    before = raw.clone()
    values = _values(6, d, seed=3)
    slots = torch.tensor([7, -1, 14, 15, -100, 0])
    flashmla.write_kv_cache(cache, values, slots)

    # expectation: the same bytes, with only the three valid tokens' fields rewritten
    want = before.clone()
    stride = cache.stride(0)
    for i, s in enumerate([7, None, 14, None, None, 0]):
        if s is None:
            continue
        page, t = divmod(s, bsz)
        base = page * stride
        if fmt is CacheFormat.FP8_V32:
            want[base + t * 656 : base + (t + 1) * 656] = F.quantize_v32(values[i, 0])
        else:
            rec, sc = F.quantize_model1(values[i, 0])
            want[base + t * 576 : base + (t + 1) * 576] = rec
            want[base + bsz * 576 + t * 8 : base + bsz * 576 + (t + 1) * 8] = sc
    assert torch.equal(raw, want)
    changed = (raw != before).sum().item()
    assert changed > 3 * (d // 2)  # the writes did happen


def test_write_kv_cache_validates():
    cache = flashmla.allocate_paged_cache(2, 4, cache_format="fp8_v32")
    slots = torch.tensor([0, 1])
    with pytest.raises(flashmla.DTypeError):  # FP8 writes take bf16 tokens
        flashmla.write_kv_cache(cache, torch.zeros(2, 1, 576), slots)
    with pytest.raises(flashmla.ShapeError):  # V3.2 tokens are 576 wide
        flashmla.write_kv_cache(cache, torch.zeros(2, 1, 512, dtype=torch.bfloat16), slots)
    with pytest.raises(flashmla.ShapeError):  # one slot per token
        flashmla.write_kv_cache(cache, torch.zeros(3, 1, 576, dtype=torch.bfloat16), slots)
    with pytest.raises(flashmla.DTypeError):
        flashmla.write_kv_cache(
            cache, torch.zeros(2, 1, 576, dtype=torch.bfloat16), slots.to(torch.float32)
        )
    plain = torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(flashmla.DTypeError):  # plain caches take their own dtype
        flashmla.write_kv_cache(plain, torch.zeros(2, 1, 64, dtype=torch.float16), slots)
    assert torch.all(storage_bytes(cache) == 0) and torch.all(plain == 0)


# --------------------------------------------------------------------------------------------
# Footprint


def test_kv_bytes_per_token():
    mla = P.DEEPSEEK_V3_MLA
    assert P.kv_bytes_per_token(mla) == 1152  # 576 bf16
    assert P.kv_bytes_per_token(mla, "fp16") == 1152
    assert P.kv_bytes_per_token(mla, "fp8_v32") == 656
    assert P.kv_bytes_per_token(mla, CacheFormat.FP8_MODEL1) == 584
    assert P.kv_bytes_per_token(P.DEEPSEEK_V3_AS_MHA) == 128 * (192 + 128) * 2 == 81920
    assert P.kv_bytes_per_token(P.DEEPSEEK_V3_AS_MHA, "fp8_v32") == 40960  # 1 byte / value
    assert P.kv_bytes_per_token(P.GQA_8x128) == 8 * (128 + 128) * 2 == 4096
    assert P.kv_bytes_per_token(P.AttentionShape("gqa", 4, 64, 32)) == 4 * 96 * 2
    with pytest.raises(ValueError):
        P.kv_bytes_per_token(mla, "fp4")


def test_kv_cache_bytes():
    # contract §5.4: a 128K-token request of a 62-layer model, 576 dims bf16 ~ 8.72 GiB
    total = P.kv_cache_bytes(P.DEEPSEEK_V3_MLA, 131072, 62)
    assert total == 1152 * 131072 * 62
    assert math.isclose(total / 2**30, 8.72, abs_tol=0.005)
    assert P.kv_cache_bytes(P.DEEPSEEK_V3_MLA, 131072, 62, "fp8_v32") == 656 * 131072 * 62
    assert P.kv_cache_bytes(P.DEEPSEEK_V3_AS_MHA, 10, 3) == 81920 * 30
    assert P.kv_cache_bytes(P.GQA_8x128, 0, 32) == 0


def test_slots_for_positions_rejects_slots_beyond_int32():
    """FlashMLA's tests fill unused table entries with 2147480000; a position that lands there
    must come back invalid (-1), not as a wrapped-around int32 slot."""
    table = torch.tensor([[3, 2147480000]], dtype=torch.int32)
    slots = flashmla.slots_for_positions(table, torch.tensor([[0, 63, 64, 100]]), 64)
    assert slots.tolist() == [[192, 255, -1, -1]]
