"""Bit-level number conversions shared by every kernel (device functions).

Kernels see 16-bit floats as int16 bits and FP8 caches as bytes (see :mod:`.launch`), so they
convert by hand: widening bf16/fp16 to fp32 is exact, narrowing fp32 rounds to nearest even
(what torch's ``.to()`` does), and FP8 e4m3 encoding follows torch's ``float8_e4m3fn`` cast.

Two rules keep one source correct on both targets:

* integers read from arrays go through ``int()`` first (numba: int64; simulator: a Python int,
  never a numpy scalar, whose fixed width would overflow in ``bits << 16``);
* reinterpreting bits as a float uses :func:`int_as_float` / :func:`float_as_int`: libdevice's
  ``__nv_int_as_float`` on the GPU, numpy views in the simulator (which has no libdevice).
"""

from __future__ import annotations

import numpy as np
from numba import float32

from . import SIM
from .launch import device_function

if SIM:

    def int_as_float(bits: int) -> np.float32:
        """The float32 whose bit pattern is the low 32 bits of ``bits``."""
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)

    def float_as_int(x: float) -> int:
        """The bit pattern of float32 ``x`` as a signed 32-bit integer."""
        return int(np.float32(x).view(np.int32))

else:
    from numba.cuda.libdevice import float_as_int, int_as_float


@device_function
def bf16_to_f32(bits):
    """bf16 bits (int16 or any int) -> float32: the bits are the top half of a float32."""
    return int_as_float((int(bits) & 0xFFFF) << 16)


@device_function
def fp16_to_f32(bits):
    """IEEE half bits -> float32 (exact; subnormals, infinities and NaN included)."""
    h = int(bits) & 0xFFFF
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:  # zero or subnormal: mantissa * 2^-24, exact in float32
        value = float32(mantissa) * float32(5.9604644775390625e-08)
        return -value if sign else value
    if exponent == 31:  # infinity, or NaN (made quiet, as torch's widening does)
        quiet = 0x400000 if mantissa != 0 else 0
        return int_as_float(sign | 0x7F800000 | quiet | (mantissa << 13))
    return int_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13))


@device_function
def half_to_f32(bits, is_fp16):
    """A 16-bit float's bits -> float32 (bf16 unless ``is_fp16``)."""
    if is_fp16:
        return fp16_to_f32(bits)
    return bf16_to_f32(bits)


@device_function
def f32_to_bf16(x):
    """float32 -> bf16 bits (0..65535), rounded to nearest even; NaN stays NaN."""
    u = float_as_int(x) & 0xFFFFFFFF
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 0x40) & 0xFFFF  # quiet NaN, sign kept
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


@device_function
def f32_to_fp16(x):
    """float32 -> IEEE half bits (0..65535), rounded to nearest even; overflow gives inf."""
    u = float_as_int(x) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00  # NaN
    if a >= 0x477FF000:  # >= 65520: rounds past the largest half (65504)
        return sign | 0x7C00
    if a >= 0x38800000:  # normal half (>= 2^-14): drop 13 mantissa bits, rebias 127 -> 15
        a += 0xFFF + ((a >> 13) & 1)
        return sign | ((a - (112 << 23)) >> 13)
    # subnormal half: round |x| * 2^24 to an integer (ties to even)
    shift = 126 - (a >> 23)  # |x| * 2^24 = mant >> shift
    if shift >= 25:
        return sign  # below 2^-25 (or a float32 zero/subnormal): rounds to zero
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@device_function
def f32_to_half(x, is_fp16):
    """float32 -> the bits of a 16-bit float (bf16 unless ``is_fp16``)."""
    if is_fp16:
        return f32_to_fp16(x)
    return f32_to_bf16(x)


@device_function
def as_int16(bits):
    """16 bits (0..65535) as the signed value an int16 array stores."""
    return bits - ((bits & 0x8000) << 1)


@device_function
def round_to_bf16(x):
    """float32 rounded to the nearest bf16 value, kept as float32."""
    return bf16_to_f32(f32_to_bf16(x))


@device_function
def e4m3_to_f32(byte):
    """float8_e4m3fn byte -> float32 (exact): sign, 4-bit exponent (bias 7), 3-bit mantissa;
    exponent 0 is subnormal (mantissa * 2^-9), 0x7F / 0xFF are NaN (no infinities)."""
    b = int(byte)
    exponent = (b >> 3) & 0xF
    mantissa = b & 7
    if (b & 0x7F) == 0x7F:
        value = int_as_float(0x7FF00000)  # NaN, with the payload torch's widening gives it
    elif exponent == 0:
        value = float32(mantissa) * float32(0.001953125)
    else:  # rebias 7 -> 127, mantissa to the top of float32's 23 bits
        value = int_as_float(((exponent + 120) << 23) | (mantissa << 20))
    return -value if b & 0x80 else value


@device_function
def e4m3_bits(v):
    """float32 ``v`` with ``|v| <= 448`` -> float8_e4m3fn byte, rounded to nearest even."""
    u = float_as_int(v) & 0xFFFFFFFF
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    if a >= (121 << 23):  # normal e4m3 (>= 2^-6): keep 3 mantissa bits, rebias 127 -> 7
        return sign | (((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3))
    # subnormal e4m3: round |v| * 2^9 to an integer (ties to even); 8 is the smallest normal
    shift = 141 - (a >> 23)  # |v| * 2^9 = mant >> shift
    if shift >= 25:
        return sign  # below 2^-10 (float32 zeros and subnormals included): rounds to zero
    mant = (a & 0x7FFFFF) | 0x800000
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@device_function
def fp8_scale_exponent(amax_bits):
    """Exponent k of the power-of-two scale 2^k of a tile whose largest magnitude has bf16 bits
    ``amax_bits`` (sign cleared): ``k = ceil(log2(max(amax / 448, 1e-4)))``, read off the bits.

    With amax = 2^e (1 + f), amax / 448 = 2^(e - 8) (1 + f) / 1.75, so k = e - 8, plus one when
    1 + f > 1.75 (mantissa bits above 0x600000); the 1e-4 floor is k >= -13."""
    a = (int(amax_bits) & 0x7FFF) << 16
    k = (a >> 23) - 127 - 8
    if (a & 0x7FFFFF) > 0x600000:
        k += 1
    return max(k, -13)
