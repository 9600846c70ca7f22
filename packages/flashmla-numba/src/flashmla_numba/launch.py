"""Everything that differs between a GPU and Numba's CUDA simulator, in one place.

Kernels are written once. On a GPU they are compiled by numba-cuda and launched on torch's
current stream; torch tensors are handed over as zero-copy device-array views (no allocation,
no synchronisation: CUDA-graph capturable). In the simulator (``NUMBA_ENABLE_CUDASIM=1``) the
same Python source runs thread by thread on the CPU over ``.numpy()`` views of CPU tensors.

16-bit floats travel as their bits (``int16`` views): numba cannot read torch's bf16 through
the CUDA array interface and numpy has no bf16 at all, so the kernels convert bits themselves
(:mod:`.numerics`). FP8 caches travel as ``uint8`` bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import cuda

from . import SIM

if SIM:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

# Threads per CTA of the attention kernels. The simulator pays for every thread (an OS thread)
# and for every barrier (proportional to the thread count), so it runs the same tiling with
# fewer, busier threads; the kernels derive their thread-to-work mapping from this number.
ATTENTION_THREADS = 64 if SIM else 256
# CTAs of the attention kernels that must fit on one SM at once (launch bounds): 1 lets ptxas
# use all the registers it wants (~170-210, no spills); 2 caps them at 128 (a few hundred bytes
# of spills) but lets two CTAs hide each other's barrier stalls. A tuning knob for the GPU.
MIN_CTAS_PER_SM = 1

if not SIM:
    from numba.cuda.core import config as _numba_config

    # Small decode grids are normal here; numba would warn about each one.
    _numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0


def kernel(**gpu_options: Any) -> Callable:
    """``cuda.jit`` for a kernel; options the simulator does not know are left out there."""
    if SIM:
        return cuda.jit
    return cuda.jit(**gpu_options)


def device_function(fn: Callable) -> Callable:
    """A device function, inlined into its callers on the GPU (so that small local arrays it
    touches stay in registers). The simulator calls the plain Python function."""
    if SIM:
        return fn
    return cuda.jit(device=True, forceinline=True)(fn)


_VIEW_DTYPE = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.int8: torch.uint8,
}


def array(t: torch.Tensor) -> Any:
    """A zero-copy view of ``t`` for a kernel argument (16-bit floats as int16 bits, FP8 bytes
    as uint8); strides are kept, so kernels index any layout as ``a[i, j, ...]``."""
    t = t.detach()
    view = _VIEW_DTYPE.get(t.dtype)
    if view is not None:
        t = t.view(view)
    if SIM:
        # The simulator's own device-array type: used in place (a numpy argument would be
        # copied in and out, and must be contiguous).
        return FakeCUDAArray(t.numpy())
    # sync=False: reading a view must not synchronise any stream (CUDA-graph capture)
    return cuda.as_cuda_array(t, sync=False)


def scalar(x: float) -> np.float32:
    """A float kernel argument typed float32 (a Python float would make numba use fp64)."""
    return np.float32(x)


_PLACEHOLDERS: dict[tuple[str, torch.dtype], Any] = {}


def placeholder(device: torch.device, dtype: torch.dtype, ndim: int) -> Any:
    """A tiny array standing in for an absent optional input (kernels never read it)."""
    key = (str(device), dtype, ndim)
    found = _PLACEHOLDERS.get(key)
    if found is None:
        t = torch.empty((1,) * ndim, dtype=dtype, device=device)  # no kernel: capturable
        found = _PLACEHOLDERS[key] = (t, array(t))  # keep the tensor alive with its view
    return found[1]


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[Any]:
    """Numba's context for ``device`` and the stream to launch on (torch's current one)."""
    if SIM:
        yield 0
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cuda.gpus[index]:
        yield cuda.external_stream(torch.cuda.current_stream(index).cuda_stream)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill. The simulator pretends to have a few, so that the
    parity suite's small cases also split long requests and exercise the combine kernel."""
    if SIM:
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class Launch:
    """One kernel launch as data: the launchers build these, :func:`run` launches them, and
    the compile test hands the same arguments to numba's ahead-of-time compiler."""

    kernel: Any  # a numba kernel (the simulator's stand-in under NUMBA_ENABLE_CUDASIM)
    grid: tuple[int, ...]
    threads: int
    args: tuple


def run(launches: Sequence[Launch], device: torch.device) -> None:
    """Launch in order on torch's current stream of ``device`` (empty grids are skipped)."""
    with on_device(device) as stream:
        for launch in launches:
            if all(g > 0 for g in launch.grid):
                launch.kernel[launch.grid, launch.threads, stream](*launch.args)
