"""Loading compiled kernels and launching them on torch's current stream.

Kernels take one argument: a parameter struct passed by value. Its layout is declared once in
Python (:func:`struct_type`) mirroring the C struct field by field; :func:`pack` fills one from
a dict. Pointers are ``data_ptr()`` integers (``0`` for "absent"), so fp8/bf16 tensors need no
DLPack support. Packing goes through :mod:`struct` (a few microseconds; this is on every call's
host path).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .compiler import Build, cubin, target_arch

# Field kinds of parameter structs: pointers and strides are 64-bit, sizes 32-bit; TMAP is a
# CUtensorMap (128 opaque bytes, 64-byte aligned: C pads the struct to a multiple of 64).
PTR, I64, I32, F32 = np.uint64, np.int64, np.int32, np.float32
TMAP = np.dtype("V128")
_CODES = {PTR: "Q", I64: "q", I32: "i", F32: "f", TMAP: "128s"}

_MAX_DYNAMIC_SMEM = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@dataclass(frozen=True)
class StructType:
    """A C struct's layout: ``dtype`` (numpy, with C's alignment and padding) and the matching
    precompiled :class:`struct.Struct`."""

    dtype: np.dtype
    packer: struct.Struct

    @property
    def names(self) -> tuple[str, ...]:
        return self.dtype.names

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def struct_type(fields: Sequence[tuple[str, type]]) -> StructType:
    """The twin of a C struct whose fields are ``fields`` in order (C alignment and padding)."""
    dtype = np.dtype(list(fields), align=True)
    if any(kind is TMAP for _, kind in fields):
        if dtype.fields[fields[0][0]][0] != TMAP:
            raise ValueError("a tensor map must be the struct's first field (64-byte aligned)")
        dtype = np.dtype({
            "names": dtype.names, "formats": [dtype.fields[n][0] for n in dtype.names],
            "offsets": [dtype.fields[n][1] for n in dtype.names],
            "itemsize": -(-dtype.itemsize // 64) * 64,
        })  # fmt: skip
    fmt, at = "<", 0
    for name, kind in fields:
        offset = dtype.fields[name][1]
        fmt += "x" * (offset - at) + _CODES[kind]
        at = offset + np.dtype(kind).itemsize
    fmt += "x" * (dtype.itemsize - at)
    return StructType(dtype, struct.Struct(fmt))


def pack(layout: StructType, values: Mapping[str, object]) -> np.void:
    """One struct value; every field must be given (a forgotten field is an error, not a 0)."""
    names = layout.dtype.names
    if len(values) != len(names) or any(n not in values for n in names):
        missing = sorted(set(names) - set(values))
        extra = sorted(set(values) - set(names))
        raise KeyError(f"struct fields missing {missing}, unknown {extra}")
    return np.void(layout.packer.pack(*[values[n] for n in names]))


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


_U64 = struct.Struct("<Q")


@dataclass
class Launch:
    """One kernel launch with its parameter struct already packed. :meth:`run` relaunches it
    with some pointer fields replaced: calls whose tensors only moved (the layers of a decoding
    step) skip building the struct again."""

    kernel: Kernel
    grid: tuple[int, ...]
    block: int
    smem: int
    params: bytearray
    offsets: dict[str, int]  # byte offset of every field

    @staticmethod
    def of(kernel: Kernel, grid: tuple[int, ...], block: int, layout: StructType,
           values: Mapping[str, object], smem: int = 0) -> Launch:  # fmt: skip
        offsets = {name: layout.dtype.fields[name][1] for name in layout.names}
        return Launch(kernel, grid, block, smem, bytearray(pack(layout, values).tobytes()), offsets)

    def run(self, pointers: Mapping[str, int | bytes] | None = None) -> None:
        for name, value in (pointers or {}).items():
            at = self.offsets[name]
            if isinstance(value, bytes):  # a tensor map
                self.params[at : at + len(value)] = value
            else:
                _U64.pack_into(self.params, at, value)
        self.kernel(self.grid, self.block, np.void(bytes(self.params)), self.smem)


@dataclass
class Kernel:
    """Function ``name`` of ``build``, loaded on device ``device``."""

    build: Build
    name: str
    device: int
    function: object
    smem_limit: int = 48 * 1024

    def __call__(self, grid: tuple[int, ...], block: int, params: np.void, smem: int = 0) -> None:
        if 0 in grid:
            return
        if smem > self.smem_limit:
            from cupy.cuda import driver

            driver.funcSetAttribute(self.function.ptr, _MAX_DYNAMIC_SMEM, smem)
            self.smem_limit = smem
        self.function(grid, (block,), (params,), shared_mem=smem, stream=_stream(self.device))


_KERNELS: dict[tuple[Build, str, int], Kernel] = {}
_MODULES: dict[tuple[Build, int], object] = {}
_STREAMS: dict[int, object] = {}
_LOCK = threading.Lock()


def capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def kernel(build: Build, name: str, device: torch.device) -> Kernel:
    """The compiled, loaded kernel (compiled through NVRTC for the device's target on first
    use, then cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (build, name, index)
    found = _KERNELS.get(key)
    if found is not None:
        return found
    with _LOCK:
        if key not in _KERNELS:
            import cupy

            module = _MODULES.get((build, index))
            if module is None:
                data = cubin(build, target_arch(capability(index)))
                with cupy.cuda.Device(index):
                    module = cupy.cuda.function.Module()
                    module.load(data)
                _MODULES[(build, index)] = module
            _KERNELS[key] = Kernel(build, name, index, module.get_function(name))
        return _KERNELS[key]


def _stream(device: int) -> object:
    """torch's current stream on ``device`` as a CuPy stream (launching anywhere else would not
    be recorded by a CUDA graph capture)."""
    handle = torch.cuda.current_stream(device).cuda_stream
    stream = _STREAMS.get(handle)
    if stream is None:
        import cupy

        stream = _STREAMS[handle] = cupy.cuda.ExternalStream(handle, device)
    return stream


_SMEM: dict[int, int] = {}


def max_smem(device: torch.device) -> int:
    """Largest dynamic shared memory per block the device allows (opt-in; cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _SMEM.get(index)
    if found is None:
        props = torch.cuda.get_device_properties(index)
        found = _SMEM[index] = int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
    return found
