"""Tensor maps for Hopper's bulk tensor copy engine (TMA), encoded on the host.

A tensor map (``CUtensorMap``, 128 opaque bytes) describes a strided tensor in global memory and
the box one copy moves; kernels take it by value in their parameter struct. It is encoded by the
driver's ``cuTensorMapEncodeTiled``, called here through ``ctypes`` (no extra Python dependency).
It embeds the tensor's address, so a call with a new tensor needs a new map: encodings are cached
per (address, shape, strides), which covers the caches of every layer of a model.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

# CUtensorMapDataType / CUtensorMapSwizzle / CUtensorMapL2promotion values (cuda.h).
DTYPE_UINT16 = 1  # 16-bit elements: bf16 and fp16 copy alike
SWIZZLE_128B = 3
L2_PROMOTION_256B = 3
MAX_STRIDE = 1 << 40


class TensorMapError(ValueError):
    """The tensor cannot be described by a tensor map (alignment, strides) or the driver
    refused it."""


def check_tiled(
    address: int, dims: Sequence[int], strides: Sequence[int], element: int
) -> str | None:
    """Why ``cuTensorMapEncodeTiled`` would refuse this tensor (``None`` if it would not):
    16-byte aligned address, outer strides (bytes) multiples of 16 below 2**40, sizes >= 1."""
    if address % 16:
        return f"address {address:#x} is not 16-byte aligned"
    if any(d < 1 or d >= 1 << 32 for d in dims):
        return f"sizes {tuple(dims)} must be in [1, 2**32)"
    if any(s % 16 or s <= 0 or s >= MAX_STRIDE for s in strides):
        return f"byte strides {tuple(strides)} must be positive multiples of 16 below 2**40"
    if dims[0] * element % 16:
        return "the innermost extent must be a multiple of 16 bytes"
    return None


@functools.cache
def _encode_fn():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=1024)
def encode_tiled(address: int, dims: tuple[int, ...], strides: tuple[int, ...],
                 box: tuple[int, ...], element: int = 2) -> bytes:  # fmt: skip
    """The 128-byte tensor map of a tensor of 16-bit elements at ``address`` with sizes ``dims``
    (innermost first), byte ``strides`` of dims 1.. and copy box ``box``, 128-byte swizzled,
    out-of-bounds elements read as zeros."""
    if element != 2:
        raise TensorMapError("only 16-bit elements are supported")
    reason = check_tiled(address, dims, strides, element)
    if reason is not None:
        raise TensorMapError(reason)
    rank = len(dims)
    out = (ctypes.c_uint8 * 128)()
    code = _encode_fn()(
        ctypes.addressof(out), DTYPE_UINT16, rank, ctypes.c_void_p(address),
        (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides),
        (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)),
        0, SWIZZLE_128B, L2_PROMOTION_256B, 0,
    )  # fmt: skip
    if code != 0:
        raise TensorMapError(
            f"cuTensorMapEncodeTiled failed with CUresult {code} "
            f"(dims {dims}, strides {strides}, box {box})"
        )
    return bytes(out)
