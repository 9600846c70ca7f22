"""Loading compiled kernels and launching them on torch's current stream.

Kernels take one argument: a parameter struct passed by value. Its layout is declared once in
Python as a numpy structured dtype (:func:`struct_type`) mirroring the C struct field by field;
:func:`pack` fills one from a dict. Pointers are ``data_ptr()`` integers (``0`` for "absent"),
so fp8/bf16 tensors need no DLPack support.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .compiler import Build, cubin, target_arch

# Field kinds of parameter structs: pointers and strides are 64-bit, sizes 32-bit.
PTR, I64, I32, F32 = np.uint64, np.int64, np.int32, np.float32

_MAX_DYNAMIC_SMEM = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


def struct_type(fields: Sequence[tuple[str, type]]) -> np.dtype:
    """The numpy twin of a C struct whose fields are ``fields`` in order. Order them by size
    (pointers and 64-bit first) and C adds no padding; ``align=True`` matches C regardless."""
    return np.dtype(list(fields), align=True)


def pack(dtype: np.dtype, values: Mapping[str, object]) -> np.void:
    """One struct value; every field must be given (a forgotten field is an error, not a 0)."""
    missing = set(dtype.names) - set(values)
    extra = set(values) - set(dtype.names)
    if missing or extra:
        raise KeyError(f"struct fields missing {sorted(missing)}, unknown {sorted(extra)}")
    record = np.zeros((), dtype)
    for name, value in values.items():
        record[name] = value
    return record.view(np.dtype((np.void, dtype.itemsize)))[()]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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


def max_smem(device: torch.device) -> int:
    """Largest dynamic shared memory per block the device allows (opt-in)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
