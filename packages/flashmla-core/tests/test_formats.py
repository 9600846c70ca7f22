"""Byte-level tests of the FP8 KV-cache formats (contract §5).

Expected bytes are written out by hand for a few tokens, and for random tokens computed by a
pure-Python encoder written from the format definition (exact rational arithmetic, no torch
float8 conversion), so the tests do not reuse the code they check.
"""

from __future__ import annotations

import bisect
import math
import struct
from fractions import Fraction

import pytest
import torch

import flashmla
from flashmla import formats as F
from flashmla.errors import DTypeError, LayoutError, ShapeError
from flashmla.formats import CacheFormat

# --------------------------------------------------------------------------------------------
# Independent pure-Python model of the formats


def _e4m3_value(code: int) -> Fraction:
    """Value of a non-negative float8_e4m3fn code (0x00..0x7E): bias 7, 3 mantissa bits."""
    e, m = code >> 3, code & 7
    if e == 0:
        return Fraction(m, 512)  # subnormal: m * 2^-9
    return (1 + Fraction(m, 8)) * Fraction(2) ** (e - 7)


_E4M3_POS = [_e4m3_value(c) for c in range(0x7F)]  # 0x7F is NaN; values ascend with the code


def e4m3_encode(v: float) -> int:
    """Round-to-nearest-even encoding of ``v`` (|v| <= 448) as an e4m3fn byte."""
    a = abs(Fraction(v))
    assert a <= 448
    i = bisect.bisect_left(_E4M3_POS, a)
    if _E4M3_POS[i] == a:
        code = i
    else:
        lo, hi = i - 1, i
        d_lo, d_hi = a - _E4M3_POS[lo], _E4M3_POS[hi] - a
        code = lo if d_lo < d_hi else hi if d_hi < d_lo else (lo if lo % 2 == 0 else hi)
    return code | (0x80 if math.copysign(1.0, v) < 0 else 0)


def e4m3_decode(byte: int) -> Fraction:
    assert byte & 0x7F != 0x7F
    v = _e4m3_value(byte & 0x7F)
    return -v if byte & 0x80 else v


def scale_exponent(tile: list[float]) -> int:
    """k with s = 2^k = 2^ceil(log2(max(amax/448, 1e-4))), exactly."""
    amax = max(abs(Fraction(v)) for v in tile)
    ratio = max(amax / 448, Fraction(1, 10000))
    k = math.ceil(math.log2(ratio))
    while Fraction(2) ** (k - 1) >= ratio:
        k -= 1
    while Fraction(2) ** k < ratio:
        k += 1
    return k


def f32_bytes(v: float) -> bytes:
    return struct.pack("<f", v)


def bf16_bytes(v: float) -> bytes:
    b = struct.pack("<f", v)
    assert b[:2] == b"\0\0", "not a bf16 value"
    return b[2:]


def quantize_tiles_ref(values: list[float], tile: int) -> tuple[bytes, list[int]]:
    data, exps = bytearray(), []
    for t in range(0, len(values), tile):
        chunk = values[t : t + tile]
        k = scale_exponent(chunk)
        exps.append(k)
        data += bytes(e4m3_encode(v / 2.0**k) for v in chunk)  # exact: power-of-two scaling
    return bytes(data), exps


def v32_ref(values: list[float]) -> bytes:
    nope, exps = quantize_tiles_ref(values[:512], 128)
    scales = b"".join(f32_bytes(2.0**k) for k in exps)
    rope = b"".join(bf16_bytes(v) for v in values[512:])
    return nope + scales + rope


def model1_ref(values: list[float]) -> tuple[bytes, bytes]:
    nope, exps = quantize_tiles_ref(values[:448], 64)
    rope = b"".join(bf16_bytes(v) for v in values[448:])
    return nope + rope, bytes(k + 127 for k in exps) + b"\0"


def dequant_ref(values: list[float], tile: int) -> list[float]:
    """What the kernels load for the quantized ``values`` (exact for power-of-two scales)."""
    data, exps = quantize_tiles_ref(values, tile)
    return [float(e4m3_decode(b) * Fraction(2) ** exps[i // tile]) for i, b in enumerate(data)]


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).flatten().tolist())


def random_tokens(n: int, d: int, seed: int, tile: int = 64) -> torch.Tensor:
    """bf16 tokens whose tiles span a wide dynamic range (tiny to > 448)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    exponent = torch.empty(n, -(-d // tile), dtype=torch.float64).uniform_(-7, 4, generator=g)
    mag = (10.0**exponent).repeat_interleave(tile, dim=1)[:, :d]
    return (x * mag).to(torch.bfloat16)


def storage_bytes(cache: torch.Tensor) -> torch.Tensor:
    """The whole byte storage behind a cache view (including page padding)."""
    return torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())


# --------------------------------------------------------------------------------------------
# Hand-built tokens. Comments give the e4m3 derivation: S.EEEE.MMM, bias 7.


def hand_token_a() -> tuple[torch.Tensor, bytes]:
    """V3.2 token: tile 0 max 448 (s=1), tile 1 zeros (s=2^-13), tile 2 max 56 (s=2^-3),
    tile 3 tiny (clamped, s=2^-13); RoPE with special bf16 bit patterns."""
    x = torch.zeros(576, dtype=torch.bfloat16)
    exp = bytearray(656)
    nope = {
        0: (448.0, 0x7E),  # 1.75 * 2^8: E=15, M=6
        1: (-448.0, 0xFE),
        2: (1.0625, 0x38),  # tie between 1.0 (M=0) and 1.125 (M=1): even -> 1.0
        3: (1.1875, 0x3A),  # tie between 1.125 (M=1) and 1.25 (M=2): even -> 1.25
        4: (232.0, 0x76),  # tie between 224 (M=6) and 240 (M=7): even -> 224
        5: (248.0, 0x78),  # tie between 240 (0x77) and 256 (0x78): even -> 256
        6: (-(2.0**-9), 0x81),  # smallest subnormal, negative
        7: (2.0**-10, 0x00),  # half the smallest subnormal: tie -> 0
        8: (3 * 2.0**-10, 0x02),  # 1.5 subnormal steps: tie between 1 and 2 -> 2
        9: (-(2.0**-11), 0x80),  # rounds to -0
        10: (0.5, 0x30),  # E=6
        11: (3.0, 0x44),  # 1.5 * 2: E=8, M=4
        12: (-0.0, 0x80),
        127: (17.0, 0x58),  # tie between 16 (M=0) and 18 (M=1): even -> 16
        # tile 2, s = 2^-3
        256: (56.0, 0x7E),  # 448
        257: (-7.0, 0xE6),  # -56 = -1.75 * 2^5: E=12, M=6
        258: (0.125, 0x38),  # 1.0
        300: (3 * 2.0**-8, 0x1C),  # 3 * 2^-5 = 1.5 * 2^-4: E=3, M=4
        # tile 3, amax 2^-20 -> ratio below 1e-4 -> s = 2^-13
        384: (2.0**-20, 0x04),  # 2^-7 = 4 * 2^-9 (subnormal)
        385: (2.0**-22, 0x01),  # 2^-9
        386: (-3 * 2.0**-21, 0x86),  # -6 * 2^-9
        387: (2.0**-25, 0x00),  # 2^-12: below half a subnormal step
        388: (2.0**-21, 0x02),
    }
    for i, (v, byte) in nope.items():
        x[i] = v
        exp[i] = byte
    # scales: 1.0, 2^-13, 2^-3, 2^-13 as little-endian float32
    exp[512:528] = bytes.fromhex("0000803f 00000039 0000003e 00000039")
    rope_bits = {
        512: 0x3F80,  # 1.0
        513: 0xC020,  # -2.5
        514: 0x8000,  # -0.0
        515: 0x7F80,  # +inf
        516: 0x0001,  # smallest bf16 subnormal
        517: 0x7FA5,  # NaN with a payload: must be copied, not canonicalised
        575: 0x4049,  # bf16(pi)
    }
    bits = x.view(torch.int16)
    for i, b in rope_bits.items():
        bits[i] = b - 0x10000 if b >= 0x8000 else b
        off = 528 + 2 * (i - 512)
        exp[off : off + 2] = b.to_bytes(2, "little")
    return x, bytes(exp)


def hand_token_b() -> tuple[torch.Tensor, bytes]:
    """V3.2 token: tile maxima just above 448 (s=2), 448*2^10 (s=2^10), 448*2^-13 (exactly the
    smallest unclamped scale) and 448*2^-14 (clamped up to 2^-13)."""
    x = torch.zeros(576, dtype=torch.bfloat16)
    exp = bytearray(656)
    nope = {
        0: (450.0, 0x76),  # s=2: 225 -> nearest 224
        1: (-2.0, 0xB8),  # -1.0
        2: (3.0, 0x3C),  # 1.5: E=7, M=4
        128: (458752.0, 0x7E),  # 448 * 2^10
        129: (1000.0, 0x38),  # 1000/1024 = 0.9766 > midpoint(0.9375, 1.0) -> 1.0
        256: (0.0546875, 0x7E),  # 448 * 2^-13
        257: (2.0**-13, 0x38),
        384: (0.02734375, 0x76),  # 448 * 2^-14; s clamped to 2^-13 -> 224
        385: (-(2.0**-14), 0xB0),  # -0.5
    }
    for i, (v, byte) in nope.items():
        x[i] = v
        exp[i] = byte
    exp[512:528] = bytes.fromhex("00000040 00008044 00000039 00000039")
    return x, bytes(exp)


def hand_token_c() -> tuple[torch.Tensor, bytes, bytes]:
    """MODEL1 token (448 NoPE in 7 tiles of 64 + 64 RoPE)."""
    x = torch.zeros(512, dtype=torch.bfloat16)
    rec = bytearray(576)
    nope = {
        0: (448.0, 0x7E),
        1: (1.0625, 0x38),
        63: (-248.0, 0xF8),
        128: (-56.0, 0xFE),
        129: (3 * 2.0**-8, 0x1C),
        192: (2.0**-20, 0x04),
        193: (-(2.0**-22), 0x81),
        256: (450.0, 0x76),
        320: (458752.0, 0x7E),
        321: (-1000.0, 0xB8),
        384: (0.02734375, 0x76),
    }
    for i, (v, byte) in nope.items():
        x[i] = v
        rec[i] = byte
    bits = x.view(torch.int16)
    for i, b in {448: 0x3F80, 449: 0xC020, 511: 0xFFC3}.items():
        bits[i] = b - 0x10000 if b >= 0x8000 else b
        off = 448 + 2 * (i - 448)
        rec[off : off + 2] = b.to_bytes(2, "little")
    # log2(s) + 127 for s = 1, 2^-13, 2^-3, 2^-13, 2, 2^10, 2^-13; then the pad byte
    scales = bytes([0x7F, 0x72, 0x7C, 0x72, 0x80, 0x89, 0x72, 0x00])
    return x, bytes(rec), scales


# --------------------------------------------------------------------------------------------
# The pure-Python model agrees with the hand derivations (so it can be trusted below)


def test_reference_encoder_matches_hand_bytes():
    for make in (hand_token_a, hand_token_b):
        x, expected = make()
        nope_ref = v32_ref([float(v) for v in x[:512].float()] + [0.0] * 64)[:528]
        assert nope_ref == expected[:528]
    x, rec, scales = hand_token_c()
    ref_rec, ref_scales = model1_ref([float(v) for v in x[:448].float()] + [0.0] * 64)
    assert ref_rec[:448] == rec[:448]
    assert ref_scales == scales


# --------------------------------------------------------------------------------------------
# quantize_v32


@pytest.mark.parametrize("make", [hand_token_a, hand_token_b])
def test_quantize_v32_hand_token_bytes(make):
    x, expected = make()
    out = F.quantize_v32(x)
    assert out.dtype == torch.uint8
    assert out.shape == (656,)
    got = as_bytes(out)
    for lo, hi, what in ((0, 512, "nope"), (512, 528, "scales"), (528, 656, "rope")):
        assert got[lo:hi] == expected[lo:hi], what


def test_quantize_v32_batched_shapes_and_random_bytes():
    x = random_tokens(6, 576, seed=1, tile=64)  # tiles of 64 so scales differ within a 128-tile
    x = x.view(2, 3, 576)
    out = F.quantize_v32(x)
    assert out.shape == (2, 3, 656)
    for i in range(2):
        for j in range(3):
            assert as_bytes(out[i, j]) == v32_ref([float(v) for v in x[i, j].float()])


def test_quantize_v32_scales_are_little_endian_float32_powers_of_two():
    x = random_tokens(4, 576, seed=2, tile=128)
    out = F.quantize_v32(x)
    for t in range(4):
        raw = as_bytes(out[t, 512:528])
        scales = struct.unpack("<4f", raw)
        for k, s in enumerate(scales):
            m, _ = math.frexp(s)
            assert m == 0.5, "scale must be a power of two"
            tile = x[t, 128 * k : 128 * (k + 1)].float()
            assert s >= 2.0**-13
            amax = tile.abs().max().item()
            assert amax <= 448 * s
            if amax / 448 > 1e-4:
                assert amax > 224 * s  # the smallest power of two that fits


def test_quantize_v32_rejects_wrong_width():
    with pytest.raises(ShapeError):
        F.quantize_v32(torch.zeros(2, 512, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# quantize_model1


def test_quantize_model1_hand_token_bytes():
    x, rec, scales = hand_token_c()
    got_rec, got_scales = F.quantize_model1(x)
    assert got_rec.dtype == torch.uint8 and got_scales.dtype == torch.uint8
    assert got_rec.shape == (576,) and got_scales.shape == (8,)
    assert as_bytes(got_rec)[:448] == rec[:448]
    assert as_bytes(got_rec)[448:] == rec[448:]
    assert as_bytes(got_scales) == scales


def test_quantize_model1_random_bytes():
    x = random_tokens(5, 512, seed=3)
    rec, sc = F.quantize_model1(x)
    assert rec.shape == (5, 576) and sc.shape == (5, 8)
    for t in range(5):
        ref_rec, ref_sc = model1_ref([float(v) for v in x[t].float()])
        assert as_bytes(rec[t]) == ref_rec
        assert as_bytes(sc[t]) == ref_sc


def test_quantize_model1_rejects_wrong_width():
    with pytest.raises(ShapeError):
        F.quantize_model1(torch.zeros(576, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Dequantization


def test_dequantize_hand_tokens():
    for make in (hand_token_a, hand_token_b):
        x, expected = make()
        rec = torch.tensor(list(expected), dtype=torch.uint8)
        out = F.dequantize_v32(rec)
        assert out.dtype == torch.bfloat16 and out.shape == (576,)
        want = dequant_ref([float(v) for v in x[:512].float()], 128)
        assert out[:512].float().tolist() == want
        # RoPE comes back bit for bit (NaN payload included)
        assert as_bytes(out[512:]) == expected[528:]
    x, rec, sc = hand_token_c()
    out = F.dequantize_model1(
        torch.tensor(list(rec), dtype=torch.uint8), torch.tensor(list(sc), dtype=torch.uint8)
    )
    assert out.shape == (512,)
    assert out[:448].float().tolist() == dequant_ref([float(v) for v in x[:448].float()], 64)
    assert as_bytes(out[448:]) == rec[448:]


@pytest.mark.parametrize("exps", [(0, -13, 8, -5), (-7, 3, 1, -1)])
def test_dequantize_v32_is_exact_for_power_of_two_scales(exps):
    codes = [c for c in range(256) if c & 0x7F != 0x7F]  # every non-NaN e4m3 code
    codes = (codes * 3)[:512]
    rec = bytes(codes) + b"".join(f32_bytes(2.0**k) for k in exps) + bytes(128)
    out = F.dequantize_v32(torch.tensor(list(rec), dtype=torch.uint8))
    want = [float(e4m3_decode(c) * Fraction(2) ** exps[i // 128]) for i, c in enumerate(codes)]
    assert out[:512].float().tolist() == want
    # signs of zero are kept too (0x80 is -0)
    neg_zero = [i for i, c in enumerate(codes) if c == 0x80]
    assert all(math.copysign(1.0, out[i].item()) < 0 for i in neg_zero)


def test_dequantize_model1_is_exact_for_power_of_two_scales():
    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    codes = (codes * 2)[:448]
    exps = [114, 127, 128, 137, 100, 150, 120]  # UE8M0 bytes: 2^(e-127)
    rec = torch.tensor(codes + [0] * 128, dtype=torch.uint8)
    sc = torch.tensor([*exps, 0], dtype=torch.uint8)
    out = F.dequantize_model1(rec, sc)
    want = [
        float(e4m3_decode(c) * Fraction(2) ** (exps[i // 64] - 127)) for i, c in enumerate(codes)
    ]
    assert out[:448].float().tolist() == want


def test_dequantize_model1_accepts_any_byte_container():
    """Caches may be float8_e4m3fn / int8 / uint8 bytes; the records decode the same (scale
    bytes >= 128, i.e. scales >= 2, must not be read as negative int8)."""
    _, rec, sc = hand_token_c()
    rec_u8 = torch.tensor(list(rec), dtype=torch.uint8)
    sc_u8 = torch.tensor(list(sc), dtype=torch.uint8)
    want = F.dequantize_model1(rec_u8, sc_u8)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        got = F.dequantize_model1(rec_u8.view(dtype), sc_u8.view(dtype))
        assert as_bytes(got) == as_bytes(want), dtype
    _, rec_a = hand_token_a()
    rec_a = torch.tensor(list(rec_a), dtype=torch.uint8)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        assert as_bytes(F.dequantize_v32(rec_a.view(dtype))) == as_bytes(F.dequantize_v32(rec_a))


def test_dequantize_v32_rounds_non_power_of_two_scales_to_bf16():
    """SM90 loads a V3.2 float32 scale as bf16 (round to nearest even), then multiplies in bf16."""
    nope = bytearray(512)
    nope[0:128] = bytes([0x38]) * 128  # 1.0
    nope[128:256] = bytes([0x38]) * 128
    nope[256:384] = bytes([0x3F]) * 128  # 1.875
    nope[384:512] = bytes([0x39]) * 128  # 1.125
    scales = [
        1 + 2.0**-8,  # tie between bf16 1.0 and 1 + 2^-7: even -> 1.0
        1 + 3 * 2.0**-8,  # tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even) -> 1 + 2^-6
        1 + 2.0**-8 + 2.0**-20,  # above the tie -> 1 + 2^-7
        3.0,  # exact
    ]
    rec = bytes(nope) + b"".join(f32_bytes(s) for s in scales) + bytes(128)
    out = F.dequantize_v32(torch.tensor(list(rec), dtype=torch.uint8)).float()
    assert torch.all(out[0:128] == 1.0)
    assert torch.all(out[128:256] == 1 + 2.0**-6)
    # 1.875 * (1 + 2^-7) = 1.8896484375 is not a bf16; the bf16 product rounds to 1.890625
    assert torch.all(out[256:384] == 1.890625)
    assert torch.all(out[384:512] == 3.375)


def test_round_trip_error_bounds():
    x = random_tokens(16, 576, seed=4, tile=128)
    deq = F.dequantize_v32(F.quantize_v32(x)).double()
    xd = x.double()
    assert torch.equal(deq[:, 512:], xd[:, 512:])  # RoPE is exact
    tiles = xd[:, :512].view(16, 4, 128)
    amax = tiles.abs().amax(-1, keepdim=True)
    s = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / 448, min=1e-4))))
    err = (deq[:, :512].view(16, 4, 128) - tiles).abs()
    # half an e4m3 ulp: 2^-4 relative for normals, 2^-10 * s in the subnormal range
    bound = torch.maximum(tiles.abs() * 2.0**-4, s * 2.0**-10)
    assert torch.all(err <= bound)
    assert torch.all(err <= 16 * s)  # at most half the top binade's ulp (32)
    unclamped = (amax / 448 > 1e-4).expand_as(err)
    assert torch.all(err[unclamped] < (amax / 14).expand_as(err)[unclamped])
    # and the error is not trivially zero: quantization does lose bits
    assert err.max() > 0

    y = random_tokens(16, 512, seed=5)
    rec, sc = F.quantize_model1(y)
    deq = F.dequantize_model1(rec, sc).double()
    yd = y.double()
    assert torch.equal(deq[:, 448:], yd[:, 448:])
    tiles = yd[:, :448].view(16, 7, 64)
    s = F.ue8m0_to_float(sc[:, :7]).double().unsqueeze(-1)
    err = (deq[:, :448].view(16, 7, 64) - tiles).abs()
    assert torch.all(err <= torch.maximum(tiles.abs() * 2.0**-4, s * 2.0**-10))


def test_zero_tiles_quantize_to_zero_with_min_scale():
    rec = F.quantize_v32(torch.zeros(3, 576, dtype=torch.bfloat16))
    assert torch.all(rec[:, :512] == 0)
    assert as_bytes(rec[0, 512:528]) == bytes.fromhex("00000039") * 4
    assert torch.all(rec[:, 528:] == 0)
    assert torch.all(F.dequantize_v32(rec) == 0)
    r1, s1 = F.quantize_model1(torch.zeros(512, dtype=torch.bfloat16))
    assert torch.all(r1 == 0)
    assert s1.tolist() == [114] * 7 + [0]


def test_ue8m0_to_float():
    got = F.ue8m0_to_float(torch.tensor([0, 114, 127, 128, 137, 254], dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.tolist() == [2.0**-127, 2.0**-13, 1.0, 2.0, 1024.0, 2.0**127]


def test_power_of_two_scale():
    amax = torch.tensor([0.0, 1e-9, 448.0, 448.0 * 2**-13, 448 * 2**-14, 449.0, 896.0, 897.0])
    got = F.power_of_two_scale(amax).tolist()
    assert got == [2.0**-13, 2.0**-13, 1.0, 2.0**-13, 2.0**-13, 2.0, 2.0, 4.0]


# --------------------------------------------------------------------------------------------
# Pages: MODEL1 block-planar placement, V3.2 interleaving, slots at odd page sizes


def test_model1_block_planar_page_placement():
    nb, bsz = 3, 3
    cache = flashmla.allocate_paged_cache(nb, bsz, cache_format="fp8_model1", page_align=576)
    stride = 4 * 576  # 3 * 584 = 1752 bytes, padded up to a multiple of 576
    assert cache.stride(0) == stride
    x_c, rec_c, sc_c = hand_token_c()
    others = random_tokens(3, 512, seed=6)
    values = torch.cat([x_c[None], others]).view(4, 1, 512)
    slots = torch.tensor([4, 0, 8, 6])  # (page, row): (1,1) (0,0) (2,2) (2,0)
    flashmla.write_kv_cache(cache, values, slots)

    expected = bytearray(nb * stride)
    for v, slot in zip(values[:, 0], slots.tolist(), strict=True):
        page, t = divmod(slot, bsz)
        rec, sc = model1_ref([float(a) for a in v.float()])
        base = page * stride
        expected[base + t * 576 : base + (t + 1) * 576] = rec
        expected[base + bsz * 576 + t * 8 : base + bsz * 576 + (t + 1) * 8] = sc
    raw = as_bytes(storage_bytes(cache))
    assert len(raw) == nb * stride
    # the hand token sits at page 1, token 1
    assert raw[stride + 576 : stride + 1152] == rec_c
    assert raw[stride + 3 * 576 + 8 : stride + 3 * 576 + 16] == sc_c
    assert raw == bytes(expected)  # nothing else (padding included) was touched

    got = F.read_tokens(cache, slots, CacheFormat.FP8_MODEL1)
    assert got.shape == (4, 1, 512)
    want = torch.tensor(
        [dequant_ref([float(a) for a in v[:448].float()], 64) for v in values[:, 0]]
    )
    assert torch.equal(got[:, 0, :448].float(), want.float())
    assert as_bytes(got[:, 0, 448:]) == as_bytes(values[:, 0, 448:])


def test_v32_token_interleaved_placement():
    nb, bsz = 2, 5
    cache = flashmla.allocate_paged_cache(nb, bsz, cache_format="fp8_v32")
    x_a, bytes_a = hand_token_a()
    x_b, bytes_b = hand_token_b()
    flashmla.write_kv_cache(cache, torch.stack([x_a, x_b])[:, None], torch.tensor([7, 2]))
    raw = as_bytes(storage_bytes(cache))
    expected = bytearray(nb * bsz * 656)
    expected[7 * 656 : 8 * 656] = bytes_a  # page 1, row 2
    expected[2 * 656 : 3 * 656] = bytes_b
    assert raw == bytes(expected)


@pytest.mark.parametrize("fmt", ["fp8_v32", "fp8_model1", "bf16", "fp16"])
@pytest.mark.parametrize("bsz", [1, 5, 53])
def test_read_write_tokens_at_arbitrary_slots(fmt, bsz):
    fmt = CacheFormat(fmt)
    d = fmt.head_dim or 576
    nb = 3
    cache = flashmla.allocate_paged_cache(
        nb, bsz, cache_format=fmt, page_align=576 if fmt is CacheFormat.FP8_MODEL1 else None
    )
    g = torch.Generator().manual_seed(bsz)
    n = max(1, (nb * bsz) // 2)
    slots = torch.randperm(nb * bsz, generator=g)[:n]
    values = random_tokens(n, d, seed=bsz + 10)
    if fmt is CacheFormat.FP16:
        values = (values.float().clamp(-6e4, 6e4)).half()
    F.write_tokens(cache, slots, values[:, None], fmt)

    got = F.read_tokens(cache, slots, fmt)
    assert got.shape == (n, 1, d)
    if fmt.is_fp8:
        assert got.dtype == torch.bfloat16
        if fmt is CacheFormat.FP8_V32:
            want = [dequant_ref([float(a) for a in v[:512].float()], 128) for v in values]
            nope = 512
        else:
            want = [dequant_ref([float(a) for a in v[:448].float()], 64) for v in values]
            nope = 448
        assert got[:, 0, :nope].float().tolist() == want
        assert torch.equal(got[:, 0, nope:], values[:, nope:])
    else:
        assert torch.equal(got[:, 0], values)
    # 2-D slot tensors gather with their own shape
    if n >= 2:
        two = F.read_tokens(cache, slots[: n // 2 * 2].view(2, -1), fmt)
        assert two.shape == (2, n // 2, 1, d)
        assert torch.equal(two.reshape(-1, 1, d), got[: n // 2 * 2])
    # every other slot still reads as zeros
    rest = torch.tensor(sorted(set(range(nb * bsz)) - set(slots.tolist())), dtype=torch.long)
    if len(rest):
        assert torch.all(F.read_tokens(cache, rest, fmt) == 0)


def test_write_through_float8_and_int8_containers_gives_same_bytes():
    values = random_tokens(4, 576, seed=7).view(4, 1, 576)
    slots = torch.tensor([3, 0, 5, 2])
    ref = flashmla.allocate_paged_cache(2, 3, cache_format="fp8_v32")
    flashmla.write_kv_cache(ref, values, slots)
    for dtype in (torch.float8_e4m3fn, torch.int8):
        cache = flashmla.allocate_paged_cache(2, 3, cache_format="fp8_v32").view(dtype)
        flashmla.write_kv_cache(cache, values, slots)
        assert torch.equal(cache.view(torch.uint8), ref)
        got = F.read_tokens(cache, slots, CacheFormat.FP8_V32)
        assert torch.equal(got, F.read_tokens(ref, slots, CacheFormat.FP8_V32))
    values1 = random_tokens(4, 512, seed=8).view(4, 1, 512)
    ref1 = flashmla.allocate_paged_cache(2, 3, cache_format="fp8_model1", page_align=576)
    flashmla.write_kv_cache(ref1, values1, slots)
    cache1 = flashmla.allocate_paged_cache(2, 3, cache_format="fp8_model1", page_align=576)
    cache1 = cache1.view(torch.int8)
    flashmla.write_kv_cache(cache1, values1, slots)
    assert as_bytes(storage_bytes(cache1)) == as_bytes(storage_bytes(ref1))
    assert torch.equal(
        F.read_tokens(cache1, slots, CacheFormat.FP8_MODEL1),
        F.read_tokens(ref1, slots, CacheFormat.FP8_MODEL1),
    )


# --------------------------------------------------------------------------------------------
# detect_cache_format


def _fp8(width: int, dtype=torch.uint8, h_kv: int = 1) -> torch.Tensor:
    return torch.zeros(2, 4, h_kv, width, dtype=dtype)


def test_detect_cache_format_accepts_valid_caches():
    det = F.detect_cache_format
    assert det("k", _fp8(656), True) is CacheFormat.FP8_V32
    assert det("k", _fp8(656, torch.float8_e4m3fn), True) is CacheFormat.FP8_V32
    assert det("k", _fp8(584, torch.int8), True) is CacheFormat.FP8_MODEL1
    padded = flashmla.allocate_paged_cache(3, 3, cache_format="fp8_model1", page_align=576)
    assert det("k", padded, True) is CacheFormat.FP8_MODEL1
    assert det("k", torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16), False) is CacheFormat.BF16
    assert det("k", torch.zeros(2, 64, 2, 576, dtype=torch.float16), False) is CacheFormat.FP16


def test_detect_cache_format_errors():
    det = F.detect_cache_format
    with pytest.raises(DTypeError) as e:
        det("k_cache", torch.zeros(2, 4, 1, 656, dtype=torch.bfloat16), True)
    assert e.value.argument == "k_cache"
    assert isinstance(e.value, TypeError)
    with pytest.raises(ShapeError):
        det("k_cache", _fp8(576), True)  # neither 656 nor 584
    with pytest.raises(ShapeError):
        det("k_cache", _fp8(656, h_kv=2), True)  # FP8 caches are MQA
    buf = torch.zeros(2, 4, 1, 700, dtype=torch.uint8)
    with pytest.raises(LayoutError):
        det("k_cache", buf[..., :656], True)  # tokens of a page not contiguous
    strided = torch.zeros(2, 4, 1, 656 * 2, dtype=torch.uint8)[..., ::2]
    with pytest.raises(LayoutError):
        det("k_cache", strided, True)
    with pytest.raises(DTypeError):
        det("k_cache", _fp8(656), False)  # bytes without is_fp8
    with pytest.raises(DTypeError):
        det("k_cache", torch.zeros(2, 64, 1, 576, dtype=torch.float32), False)
    with pytest.raises(DTypeError):
        det("k_cache", torch.zeros(2, 4, 1, 656, dtype=torch.int32), True)


def test_cache_format_properties():
    assert CacheFormat("fp8_v32").bytes_per_token == 656
    assert CacheFormat("fp8_model1").bytes_per_token == 584
    assert CacheFormat.FP8_V32.head_dim == 576 and CacheFormat.FP8_MODEL1.head_dim == 512
    assert CacheFormat.BF16.bytes_per_token is None and CacheFormat.FP16.head_dim is None
    assert [f.is_fp8 for f in CacheFormat] == [False, False, True, True]
    assert str(CacheFormat.FP8_MODEL1) == "fp8_model1"
