"""Every backend's paged-cache write, byte for byte against the reference backend
(``flashmla.formats``' quantizer). Every comparison covers the cache's whole storage, so page
padding and the rows of skipped slots must stay untouched too. Inputs are built on the CPU and
moved to the suite's device with their strides (and the bytes their strides skip)."""

from __future__ import annotations

import pytest
import torch

import flashmla
from flashmla.problems import build_cache_write

from .conftest import DEVICE, skip_unless_supported

FP8_DIMS = {"fp8_v32": 576, "fp8_model1": 512}
NOPE = {"fp8_v32": (512, 128), "fp8_model1": (448, 64)}  # (NoPE dims, tile)
BF16_MAX_FINITE = 0x7F7F


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of ``t``'s storage, including what its strides skip."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def clone_strided(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A copy of ``t`` (on ``device``) with its own copy of the whole storage and the same
    strides."""
    buf = storage_bytes(t).to(device or t.device, copy=True)
    flat = torch.empty(0, dtype=t.dtype, device=buf.device).set_(buf.untyped_storage())
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


def random_fill(t: torch.Tensor, seed: int) -> None:
    """Random bytes everywhere, so that every untouched or newly written byte is visible."""
    g = torch.Generator().manual_seed(seed)
    b = storage_bytes(t)
    b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=g))


def write(backend: str, cache, new_kv, slots, is_fp8: bool) -> None:
    """``backend``'s write, skipped where it does not support these inputs."""
    skip_unless_supported(backend, build_cache_write(cache, new_kv, slots, is_fp8))
    with flashmla.use_backend(backend):
        flashmla.write_kv_cache(cache, new_kv, slots, is_fp8=is_fp8)


def check_write(
    backend: str, cache: torch.Tensor, new_kv: torch.Tensor, slots: torch.Tensor, is_fp8: bool
) -> None:
    """Write with ``backend`` on the suite's device and with the reference backend on the CPU;
    compare every byte."""
    expected = clone_strided(cache)
    with flashmla.use_backend("ref"):
        flashmla.write_kv_cache(expected, new_kv, slots, is_fp8=is_fp8)
    cache = clone_strided(cache, DEVICE)
    new_kv, slots = clone_strided(new_kv, DEVICE), slots.to(DEVICE)
    before = storage_bytes(cache).clone()
    write(backend, cache, new_kv, slots, is_fp8)
    got, want = storage_bytes(cache).cpu(), storage_bytes(expected)
    before = before.cpu()
    assert torch.equal(got, want), f"{int((got != want).sum())} bytes differ"
    capacity = cache.shape[0] * cache.shape[1]
    if ((slots >= 0) & (slots < capacity)).any():
        assert not torch.equal(got, before), "nothing was written"


def valid_and_invalid_slots(
    capacity: int, n_valid: int, dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """``n_valid`` distinct valid slots interleaved with -1, capacity, a large negative and a
    huge one (beyond int32 for int64 mappings)."""
    valid = torch.randperm(capacity, generator=g)[:n_valid]
    huge = 2**40 + 3 if dtype == torch.int64 else 2**31 - 1
    invalid = torch.tensor([-1, capacity, huge, -capacity - 1, -(2**31)])
    mixed = torch.cat([valid, invalid])
    return mixed[torch.randperm(mixed.numel(), generator=g)].to(dtype)


def fp8_cache(
    fmt: str, num_blocks: int, page: int, page_align: int | None, dtype: torch.dtype, seed: int
):
    cache = flashmla.allocate_paged_cache(num_blocks, page, cache_format=fmt, page_align=page_align)
    random_fill(cache, seed)
    return cache.view(dtype)


def wide_range_tokens(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """bf16 tokens whose magnitudes span many decades, tile by tile."""
    x = torch.randn(n, 1, d, generator=g)
    decade = torch.randint(-30, 31, (n, 1, d // 64), generator=g).float()
    return (x * torch.pow(10.0, decade).repeat_interleave(64, dim=-1)).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# FP8 layouts


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("page_align", [None, 576])
@pytest.mark.parametrize("page", [1, 3, 61, 64])
@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_matches_reference(backend, fmt, page, page_align, slot_dtype):
    g = torch.Generator().manual_seed(page * 7 + (page_align or 0))
    num_blocks = max(2, 8 // page)
    cache = fp8_cache(fmt, num_blocks, page, page_align, torch.uint8, seed=page)
    slots = valid_and_invalid_slots(num_blocks * page, min(6, num_blocks * page), slot_dtype, g)
    x = wide_range_tokens(slots.numel(), FP8_DIMS[fmt], g)
    check_write(backend, cache, x, slots, is_fp8=True)


@pytest.mark.parametrize("container", [torch.float8_e4m3fn, torch.int8, torch.uint8])
@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_container_dtypes(backend, fmt, container):
    g = torch.Generator().manual_seed(1)
    cache = fp8_cache(fmt, 3, 5, 576, container, seed=2)
    slots = torch.tensor([14, 0, 7], dtype=torch.int32)
    check_write(
        backend, cache, (torch.randn(3, 1, FP8_DIMS[fmt], generator=g) * 5).bfloat16(), slots, True
    )


def bf16_step(ulps: int, v: float) -> float:
    """The bf16 value ``ulps`` units away from bf16(v) (same sign, magnitude moves up)."""
    return (torch.tensor([v]).bfloat16().view(torch.int16) + ulps).view(torch.bfloat16).item()


def edge_case_tiles(tile: int, g: torch.Generator) -> list[torch.Tensor]:
    """Tiles (fp32 values, all exactly representable in bf16) aimed at the scale rule and the
    e4m3 rounding: zeros, amax exactly 448 * 2^k (and one bf16 ulp either side), amax at and
    around the 1e-4 * 448 clamp, bf16 subnormals, huge values, signed zeros, e4m3 ties."""

    def with_amax(amax: float) -> torch.Tensor:
        t = torch.rand(tile, generator=g) * 2 - 1
        t = t * amax * torch.pow(2.0, -torch.randint(0, 12, (tile,), generator=g).float())
        t[torch.randint(0, tile, (1,), generator=g)] = amax * (
            1 if torch.rand(1, generator=g) < 0.5 else -1
        )
        return t

    tiles = [torch.zeros(tile), -torch.zeros(tile)]
    for k in (-13, -12, -5, -1, 0, 1, 7, 20, 100, 119):
        edge = 448.0 * 2.0**k
        tiles += [with_amax(edge), with_amax(bf16_step(1, edge)), with_amax(bf16_step(-1, edge))]
    clamp = 448.0 * 1e-4  # below this amax the scale is 2^-13
    tiles += [with_amax(v) for v in (clamp, bf16_step(1, clamp), bf16_step(-1, clamp), 1e-6)]
    sub = torch.arange(1, tile + 1, dtype=torch.int16).view(torch.bfloat16).float()
    tiles += [sub, -sub, torch.full((tile,), 1e-30), torch.full((tile,), -3.0e38)]
    # e4m3 ties at scale 1 (amax 448): halfway between neighbouring e4m3 values, normal and subnormal
    ties = torch.tensor([448.0, 1.0625, 1.1875, 17.0, 19.0, 0.001953125 * 1.5, 0.001953125 * 2.5,
                         0.001953125 * 0.5, 0.015625 * 1.0625, 0.0146484375, 232.0, 240.0])  # fmt: skip
    tiles.append(torch.cat([ties, -ties, torch.zeros(tile - 2 * ties.numel())]))
    return [t.bfloat16().float() for t in tiles]


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_scale_edge_cases(backend, fmt):
    g = torch.Generator().manual_seed(3)
    nope, tile = NOPE[fmt]
    per_token = nope // tile
    tiles = edge_case_tiles(tile, g)
    tiles += [torch.zeros(tile)] * (-len(tiles) % per_token)
    n = len(tiles) // per_token
    x = torch.empty(n, 1, FP8_DIMS[fmt])
    x[:, 0, :nope] = torch.stack(tiles).view(n, nope)
    x[:, 0, nope:] = torch.randn(n, 64, generator=g) * 1e3
    cache = fp8_cache(fmt, 3, 8, 576, torch.uint8, seed=4)
    slots = torch.randperm(24, generator=g)[:n].to(torch.int64)
    check_write(backend, cache, x.bfloat16(), slots, is_fp8=True)


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_all_bf16_mantissas(backend, fmt):
    """Every bf16 magnitude from amax * 2^-14 up to amax, for several amaxes: covers each e4m3
    normal and subnormal code, every rounding tie and every underflow to zero."""
    g = torch.Generator().manual_seed(5)
    nope, tile = NOPE[fmt]
    per_token = nope // tile
    all_bits = torch.arange(0, BF16_MAX_FINITE + 1, dtype=torch.int32).to(torch.int16)
    magnitudes = all_bits.view(torch.bfloat16).float()
    tiles = []
    for amax in (448.0, 448.0 * 2.0**-20, 1.0, 300.0, 2.0**-100, 7.5e3):
        amax = torch.tensor(amax).bfloat16().float().item()
        pool = magnitudes[(magnitudes <= amax) & (magnitudes >= amax * 2.0**-14)]
        pool = pool[torch.randperm(pool.numel(), generator=g)]
        pool = pool * torch.where(torch.rand(pool.numel(), generator=g) < 0.5, -1.0, 1.0)
        body = tile - 1
        pool = torch.cat([pool, torch.zeros(-pool.numel() % body)]).view(-1, body)
        tiles += [torch.cat([torch.tensor([amax]), row]) for row in pool]
    tiles += [torch.zeros(tile)] * (-len(tiles) % per_token)
    n = len(tiles) // per_token
    x = torch.zeros(n, 1, FP8_DIMS[fmt])
    x[:, 0, :nope] = torch.stack(tiles).view(n, nope)
    x[:, 0, nope:] = magnitudes[torch.randint(0, magnitudes.numel(), (n, 64), generator=g)]
    num_blocks = (n + 15) // 16
    cache = fp8_cache(fmt, num_blocks, 16, None, torch.uint8, seed=6)
    slots = torch.randperm(num_blocks * 16, generator=g)[:n].to(torch.int32)
    check_write(backend, cache, x.bfloat16(), slots, is_fp8=True)


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_strided_inputs(backend, fmt):
    """A non-contiguous new_kv (a slice of a wider buffer) and a strided slot_mapping."""
    g = torch.Generator().manual_seed(7)
    d = FP8_DIMS[fmt]
    wide = (torch.randn(5, 2, d + 32, generator=g) * 20).bfloat16()
    x = wide[:, 1:, 16 : 16 + d]
    slots = torch.tensor([3, -5, 9, 99, 1, -1, 0, 7, 12, 2], dtype=torch.int64)[::2]
    cache = fp8_cache(fmt, 2, 7, 576, torch.uint8, seed=8)
    check_write(backend, cache, x, slots, is_fp8=True)


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1"])
def test_fp8_only_invalid_slots_and_empty(backend, fmt):
    cache = fp8_cache(fmt, 2, 3, 576, torch.uint8, seed=9)
    before = storage_bytes(cache).clone()
    x = torch.randn(4, 1, FP8_DIMS[fmt]).bfloat16()
    slots = torch.tensor([-1, 6, 2**31 - 1, -7], dtype=torch.int32)
    cache, x, slots = clone_strided(cache, DEVICE), x.to(DEVICE), slots.to(DEVICE)
    write(backend, cache, x, slots, True)
    write(backend, cache, x[:0], slots[:0], True)
    assert torch.equal(storage_bytes(cache).cpu(), before)


# --------------------------------------------------------------------------------------------
# Plain bf16 / fp16 caches


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("h_kv", "d"), [(1, 576), (2, 64), (3, 200)])
@pytest.mark.parametrize("page", [1, 3, 61, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_matches_reference(backend, dtype, page, h_kv, d, slot_dtype):
    g = torch.Generator().manual_seed(page + d)
    num_blocks = max(2, 8 // page)
    cache = torch.empty(num_blocks, page, h_kv, d, dtype=dtype)
    random_fill(cache, seed=page)
    slots = valid_and_invalid_slots(num_blocks * page, min(6, num_blocks * page), slot_dtype, g)
    x = torch.randn(slots.numel(), h_kv, d, generator=g).to(dtype)
    check_write(backend, cache, x, slots, is_fp8=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_strided_cache_and_inputs(backend, dtype):
    """Padded head and page strides (a slice of a wider buffer), permuted page order, a
    non-contiguous new_kv and a strided slot_mapping; bits (NaN payloads too) copied as they are."""
    g = torch.Generator().manual_seed(11)
    buf = torch.empty(6, 5, 4, 80, dtype=dtype)
    random_fill(buf, seed=12)
    cache = buf[::2, :, 1:3, 8:72]  # [3, 5, 2, 64], stride(0) skips pages
    assert not cache.is_contiguous()
    src = torch.randint(-(2**15), 2**15, (4, 2, 3, 70), dtype=torch.int16, generator=g)
    x = src.view(dtype)[:, 1, 1:, 3:67]  # [4, 2, 64]
    slots = torch.tensor([14, 100, 0, -1, 7, 15, 3, 1], dtype=torch.int32)[::2]
    check_write(backend, cache, x, slots, is_fp8=False)
