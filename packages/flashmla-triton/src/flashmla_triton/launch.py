"""A kernel launch as data: run it, or compile it ahead of time for a GPU target (no GPU needed).

Keeping launches as data lets the AOT tests compile exactly the configurations the launchers use
and report registers and spills for sm_80, sm_90 and sm_100 on a machine without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

_DTYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
    torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv",
}  # fmt: skip


@dataclass
class Launch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # every parameter by name, constexprs included
    num_warps: int = 4
    num_stages: int = 1
    constexprs: frozenset[str] = field(default_factory=frozenset)

    def __call__(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](
                **self.args, num_warps=self.num_warps, num_stages=self.num_stages
            )

    def signature(self) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
        """Types, constants and attributes exactly as Triton's launcher specializes them:
        ints equal to 1 become constants, ints and pointers divisible by 16 are marked so."""
        sig, const, attrs = {}, {}, {}
        aligned = [["tt.divisibility", 16]]
        for i, name in enumerate(self.kernel.arg_names):
            value = self.args[name]
            if name in self.constexprs or value is None or (type(value) is int and value == 1):
                sig[name], const[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                sig[name] = "*" + _DTYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = aligned
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = aligned
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{name}: cannot type {type(value).__name__}")
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
