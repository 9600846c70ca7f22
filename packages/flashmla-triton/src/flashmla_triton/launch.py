"""A kernel launch as data: run it, or compile it ahead of time for a GPU target (no GPU needed).

Keeping launches as data lets the AOT tests compile exactly the configurations the launchers use
and report registers and spills for sm_80, sm_90 and sm_100 on a machine without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.tools.tensor_descriptor import TensorDescriptor

from . import INTERPRET

_COMPILED: dict[tuple, Any] = {}
_MAX_COMPILED = 4096  # distinct (kernel, shapes, strides) combinations kept for direct launch


def _address(value: Any) -> int:
    return value.data_ptr() if isinstance(value, torch.Tensor) else value.base.data_ptr()


def _launch_key(values: list[Any]) -> tuple:
    """Everything Triton specializes a kernel on, cheaply: ints by value (so "== 1" and
    "divisible by 16" are covered), tensors by dtype and 16-byte alignment, descriptors by
    dtype and block shape."""
    key = []
    for v in values:
        kind = type(v)
        if kind is torch.Tensor or isinstance(v, torch.Tensor):
            key.append((v.dtype, v.data_ptr() & 15))
        elif kind is torch.dtype:
            key.append(v)
        elif kind is TensorDescriptor:
            key.append((v.base.dtype, *v.block_shape))
        else:
            key.append(v)
    return tuple(key)


@dataclass
class Launch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # every parameter by name, constexprs included
    num_warps: int = 4
    num_stages: int = 1
    constexprs: frozenset[str] = field(default_factory=frozenset)
    device: int = 0  # CUDA device index the tensors live on
    static_key: tuple | None = None  # set by template(): the hashed non-tensor arguments
    tensor_names: tuple[str, ...] = ()

    def __call__(self) -> None:
        """Launch on torch's current stream. The first launch of a specialization goes through
        Triton's JIT (compiling if needed); later ones call the compiled kernel directly, which
        skips Triton's per-launch argument binding (decode calls are latency-critical)."""
        if not all(g > 0 for g in self.grid):
            return
        if INTERPRET:
            self.kernel[self.grid](
                **self.args, num_warps=self.num_warps, num_stages=self.num_stages
            )
            return
        values = [self.args[name] for name in self.kernel.arg_names]
        if self.static_key is None:
            key = (self.kernel, self.num_warps, self.num_stages, self.device, *_launch_key(values))
        else:  # only the tensors' alignment can differ from the template this came from
            key = (self.static_key, *[_address(self.args[n]) & 15 for n in self.tensor_names])
        self._launch(key, values)

    def template(self) -> Launch:
        """This launch as a template: everything but its tensors is fixed and hashed once, so
        :meth:`run_with` costs little more than the kernel launch itself."""
        names = tuple(
            n for n, v in self.args.items() if isinstance(v, (torch.Tensor, TensorDescriptor))
        )
        fixed = [
            v.dtype if isinstance(v, torch.Tensor) else v
            for v in (self.args[n] for n in self.kernel.arg_names)
        ]
        key = (self.kernel, self.num_warps, self.num_stages, self.device, *_launch_key(fixed))
        return replace(self, static_key=key, tensor_names=names)

    def run_with(self, tensors: dict[str, Any]) -> None:
        """Launch this template with new tensors (same dtypes, shapes and strides) in place of
        its own; names it does not take are ignored."""
        if INTERPRET or not all(g > 0 for g in self.grid):
            replace(
                self, args={**self.args, **{n: v for n, v in tensors.items() if n in self.args}}
            )()
            return
        order = self.kernel.arg_names
        slots = self.__dict__.get("_slots")
        if slots is None:  # first use: where each tensor goes in the argument list
            slots = self.__dict__["_slots"] = {n: order.index(n) for n in self.tensor_names}
            self.__dict__["_values"] = [self.args[n] for n in order]
        values = list(self.__dict__["_values"])
        for name, value in tensors.items():
            index = slots.get(name)
            if index is not None:
                values[index] = value
        self._launch((self.static_key, *[_address(values[i]) & 15 for i in slots.values()]), values)

    def _launch(self, key: tuple, values: list[Any]) -> None:
        """The compiled kernel for ``key`` launched on ``values`` (all parameters in order);
        the first time, Triton's JIT launches it and hands the compiled kernel back."""
        compiled = _COMPILED.get(key)
        if compiled is None:
            if len(_COMPILED) >= _MAX_COMPILED:
                _COMPILED.clear()
            args = dict(zip(self.kernel.arg_names, values))
            _COMPILED[key] = self.kernel[self.grid](
                **args, num_warps=self.num_warps, num_stages=self.num_stages
            )
            return
        grid = (*self.grid, 1, 1)
        compiled.run(
            grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device),
            compiled.function, compiled.packed_metadata, None, knobs.runtime.launch_enter_hook,
            knobs.runtime.launch_exit_hook, *values,
        )  # fmt: skip

    def signature(self) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
        """Types, constants and attributes exactly as Triton's launcher specializes them
        (ints equal to 1 become constants; ints and pointers divisible by 16 are marked)."""
        sig, const, attrs = {}, {}, {}
        for i, name in enumerate(self.kernel.arg_names):
            value = self.args[name]
            if name in self.constexprs:
                sig[name], const[name] = "constexpr", value
                continue
            ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
            sig[name] = ty
            if ty == "constexpr":
                const[name] = value
            elif key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, const, attrs

    def compile(self, cc: int) -> Any:
        """Compile for ``sm_<cc>`` (e.g. 90) without a GPU; returns Triton's compiled kernel."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        sig, const, attrs = self.signature()
        src = ASTSource(fn=self.kernel, signature=sig, constexprs=const, attrs=attrs)
        target = GPUTarget("cuda", cc, 32)
        return triton.compile(
            src, target=target, options={"num_warps": self.num_warps, "num_stages": self.num_stages}
        )


def resource_usage(compiled: Any) -> dict[str, Any]:
    """Registers, spill stores/loads, local memory and shared memory from ``cuobjdump``, and
    whether the SASS uses Hopper's warpgroup MMA (HGMMA) or the warp-level one (HMMA)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout

    def number(key: str) -> int:
        m = re.search(rf"{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return {
        "registers": number("REG"),
        "stack": number("STACK"),
        "local": number("LOCAL"),
        "shared": number("SHARED"),
        "hgmma": "HGMMA" in sass,
        "hmma": "HMMA" in sass,
    }
