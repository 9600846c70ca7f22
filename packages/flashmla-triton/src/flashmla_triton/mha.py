"""Dense MHA prefill (varlen, bottom-right causal, GQA) forward and backward: Triton launchers.

``mha_forward(p) -> (out, lse)`` and ``mha_backward(p, out, lse, dout, dlse) -> (dq, dk, dv)``;
the kernels are in :mod:`flashmla_triton.kernels.mha`.

Semantics beyond FlashMLA's contract (§3), documented here:
- a query row that sees no key (causal with ``L_q > L_k``, or ``L_k = 0``) gets ``out = 0`` and
  ``lse = +inf``; its gradients are 0 (``P = exp(s - lse) = 0``).
- GQA is supported in the backward too (dK/dV sum the group's query heads, deterministically).
- the backward is bitwise deterministic (no atomics); ``dlse`` (may be None) is honoured.
- rows past ``cu_seqlens[-1]`` (if the tensors are longer) are not written, as in FlashMLA.

Launch configurations are fixed per GPU tier and ``(d_qk, d_v, causal)`` (no autotuning: it would
run on the first call, time kernels inside CUDA-graph capture and cannot run under the
interpreter); :func:`configs` lists them so tests can compile each ahead of time, :func:`tune`
times alternatives on a GPU.

On sm_90+ the kernels build TMA descriptors on the device; Triton then asks for a small global
scratch buffer (128 bytes per descriptor and program) through ``triton.set_allocator``. If no
allocator is set in the calling context, a torch one is installed there (see
:func:`_set_allocator`); a user's allocator is left alone. Everything stays on torch's current
stream and is CUDA-graph capturable (no host synchronisation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
from torch import Tensor

from flashmla.problems import MhaProblem

from . import INTERPRET
from .kernels import mha as _k

HEAD_DIMS = ((128, 128), (192, 128), (64, 64), (128, 64))  # keep in sync with __init__.spec()


@dataclass(frozen=True)
class MhaConfig:
    """``block_m`` = queries per tile, ``block_n`` = keys per tile (for every kernel)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Launch configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages) per tier and head dims; the
# same for causal and not. "sm90" (Hopper, 227 KiB of shared memory, TMA): BLOCK_M 128 = two
# warpgroups of wgmma M=64 for the forward and dQ, 128-key tiles in the forward (TMA loads keep
# the registers for them). dK/dV programs hold 128 keys (M of their main dots) and step over 32
# or 64 queries: the dK+dV accumulators alone take 128 x (d_qk + d_v) fp32, and 64-query steps
# spill at d_qk = 192. "sm100": the same except where tcgen05 code spills. "sm80" (Ampere, Ada,
# consumer Blackwell: every one fits 99 KiB): no TMA, mma.sync keeps operands in registers, so
# tiles are smaller. tests/test_mha_compile.py compiles each for its targets: no spills, shared
# memory in budget. Re-tune with :func:`tune` on the GPU.
_TABLE: dict[str, dict[tuple[int, int], tuple[tuple[int, ...], ...]]] = {
    #            fwd                dq                 dkdv
    "sm90": {
        (192, 128): ((128, 128, 8, 2), (128, 64, 8, 2), (32, 128, 8, 3)),
        (128, 128): ((128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)),
        (64, 64): ((128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 8, 3)),
        (128, 64): ((128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)),
    },
    "sm100": {
        (192, 128): ((128, 128, 8, 2), (128, 64, 8, 2), (32, 128, 8, 3)),
        (128, 128): ((128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)),
        (64, 64): ((128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2)),
        (128, 64): ((128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)),
    },
    "sm80": {
        (192, 128): ((128, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2)),
        (128, 128): ((128, 64, 8, 3), (128, 32, 8, 2), (32, 64, 8, 2)),
        (64, 64): ((128, 64, 8, 3), (128, 64, 8, 2), (32, 128, 8, 2)),
        (128, 64): ((128, 64, 8, 3), (128, 32, 8, 2), (32, 64, 8, 2)),
    },
}
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
_CONFIGS: dict[tuple[str, str, int, int, bool], MhaConfig] = {
    (arch, kernel, *dims, causal): MhaConfig(*cfg[i])
    for arch, table in _TABLE.items()
    for dims, cfg in table.items()
    for i, kernel in enumerate(KERNELS)
    for causal in (False, True)
}
assert all(dims in HEAD_DIMS for table in _TABLE.values() for dims in table)


def configs() -> dict[tuple[str, str, int, int, bool], MhaConfig]:
    """Every launch configuration, keyed by ``(arch, kernel, d_qk, d_v, causal)``: arch is
    ``"sm90"`` (compute capability 9.x, and the interpreter), ``"sm100"`` (10.x) or ``"sm80"``
    (the rest); kernel is ``"fwd"``, ``"bwd_dq"`` or ``"bwd_dkdv"``. To try other tiles, pass
    ``config=`` / ``dq_config=`` / ``dkdv_config=`` to the launchers or edit ``_CONFIGS``."""
    return dict(_CONFIGS)


@functools.cache
def _arch_of(device: torch.device) -> str:
    if device.type != "cuda":  # the interpreter runs the Hopper configurations
        return "sm90"
    major, _ = torch.cuda.get_device_capability(device)
    return {9: "sm90", 10: "sm100"}.get(major, "sm80")


def _split(d: int) -> tuple[int, int]:
    """``d = D_A + D_B`` with both powers of two (D_B may be 0): 192 -> (128, 64)."""
    d_a = 1 << (d.bit_length() - 1)
    d_b = d - d_a
    if d < 16 or (d_b and (d_b < 16 or d_b & (d_b - 1))):
        raise ValueError(f"head dim {d} is not supported by the Triton MHA kernels")
    return d_a, d_b


def _config(kernel: str, p: MhaProblem, override: MhaConfig | None) -> MhaConfig:
    if override is not None:
        return override
    key = (_arch_of(p.q.device), kernel, p.q.shape[2], p.v.shape[2], p.causal)
    if key not in _CONFIGS:
        raise ValueError(f"no Triton MHA config for (d_qk, d_v) = {key[2:4]}")
    return _CONFIGS[key]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _use_tma(p: MhaProblem, tma: bool | None, *tensors: Tensor) -> bool:
    """TMA (device-side tensor descriptors, one per sequence) on sm_90+, when the hardware's
    alignment rules hold for every tile source: 16-byte aligned base, row and head strides."""
    if tma is not None:
        return tma
    if _arch_of(p.q.device) == "sm80":
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(t.stride(i) * t.element_size() % 16 == 0 for i in (0, 1))
        for t in tensors
    )


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    # torch's caching allocator: cheap, on the current device, fine inside CUDA-graph capture
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # Triton's allocator slot (private): lets us keep an allocator the user has set
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _ALLOCATOR
except ImportError:  # pragma: no cover - moved in some Triton version: always set ours
    _NullAllocator, _ALLOCATOR = None, None


def _set_allocator(tma: bool) -> None:
    """Device-side descriptors live in a global scratch buffer that Triton's launcher requests
    from the context's allocator, a ContextVar (autograd's backward thread has its own context,
    so this runs before every launch). An allocator the user has set is kept."""
    if not tma or INTERPRET:
        return
    if _ALLOCATOR is not None and not isinstance(_ALLOCATOR.get(), _NullAllocator):
        return
    triton.set_allocator(_scratch)


def mha_forward(
    p: MhaProblem, config: MhaConfig | None = None, tma: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``out`` (q's dtype) and ``lse`` (float32, natural log, stride ``(1, total_q)``).
    ``config`` / ``tma`` override the automatic choices (tests, tuning)."""
    q, k, v = p.q, p.k, p.v
    _, h_q, d_qk = q.shape
    h_kv, d_v = k.shape[1], v.shape[2]
    d_a, d_b = _split(d_qk)
    cfg = _config("fwd", p, config)
    out, lse = p.empty_outputs()
    grid = (triton.cdiv(p.max_seqlen_q, cfg.block_m), h_q, p.batch)
    if 0 in grid or out.numel() == 0:
        return out, lse
    tma = _use_tma(p, tma, k, v)
    _set_allocator(tma)
    _k.mha_fwd_kernel[grid](
        q, k, v, out, lse, p.cu_seqlens_q, p.cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        p.softmax_scale * _k.LOG2E.value,
        GROUP=h_q // h_kv, CAUSAL=p.causal, SCALE_NEG=p.softmax_scale < 0,
        D_A=d_a, D_B=d_b, D_V=d_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma,
        UPCAST=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def mha_backward(
    p: MhaProblem, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    dq_config: MhaConfig | None = None, dkdv_config: MhaConfig | None = None,
    tma: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v (in q's dtype) given ``dout`` and, optionally, ``dlse``.
    ``*_config`` / ``tma`` override the automatic choices (tests, tuning)."""
    q, k, v = p.q, p.k, p.v
    total_q, h_q, d_qk = q.shape
    total_k, h_kv, _ = k.shape
    d_v = v.shape[2]
    d_a, d_b = _split(d_qk)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # autograd may hand over expanded (stride-0) gradients: the kernels need unit last strides
    out, dout = _last_dim_contiguous(out), _last_dim_contiguous(dout.to(q.dtype))
    lse = lse.float()
    dlse = dlse.float() if dlse is not None else None
    delta = torch.empty((h_q, total_q), dtype=torch.float32, device=q.device)
    tma_kv, tma_q = _use_tma(p, tma, k, v), _use_tma(p, tma, q, dout)
    _set_allocator(tma_kv or tma_q)
    scale = p.softmax_scale
    common: dict[str, Any] = dict(
        GROUP=h_q // h_kv, CAUSAL=p.causal, D_A=d_a, D_B=d_b, D_V=d_v, UPCAST=INTERPRET
    )

    cfg = _config("bwd_dq", p, dq_config)
    grid = (triton.cdiv(p.max_seqlen_q, cfg.block_m), h_q, p.batch)
    if 0 in grid or total_q == 0:
        dq.zero_()
    else:
        dl = dlse if dlse is not None else lse  # dummy pointer when there is no dlse
        _k.mha_bwd_dq_kernel[grid](
            q, k, v, out, dout, lse, dl, delta, dq, p.cu_seqlens_q, p.cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            lse.stride(0), lse.stride(1), dl.stride(0), dl.stride(1), delta.stride(0),
            dq.stride(0), dq.stride(1),
            scale, scale * _k.LOG2E.value, HAS_DLSE=dlse is not None, TMA=tma_kv, **common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    cfg = _config("bwd_dkdv", p, dkdv_config)
    grid = (triton.cdiv(p.max_seqlen_k, cfg.block_n), h_kv, p.batch)
    if 0 in grid or total_k == 0 or total_q == 0:
        dk.zero_()
        dv.zero_()
    else:
        _k.mha_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, p.cu_seqlens_q, p.cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1), delta.stride(0),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            scale, scale * _k.LOG2E.value, TMA=tma_q, **common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dq, dk, dv


def aot_source_args(
    arch: str, kernel: str, d_qk: int, d_v: int, causal: bool, dtype: str = "bf16", group: int = 1
) -> tuple[Any, dict[str, str], dict[str, Any], dict]:
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource``: the kernel as
    :func:`mha_forward` / :func:`mha_backward` launch it on ``arch`` for contiguous inputs
    (pointers and strides divisible by 16, lse's unit stride specialised, as Triton's JIT does;
    TMA on sm90/sm100)."""
    cfg = _CONFIGS[arch, kernel, d_qk, d_v, causal]
    d_a, d_b = _split(d_qk)
    fn = {"fwd": _k.mha_fwd_kernel, "bwd_dq": _k.mha_bwd_dq_kernel,
          "bwd_dkdv": _k.mha_bwd_dkdv_kernel}[kernel]  # fmt: skip
    constexprs: dict[str, Any] = dict(
        GROUP=group, CAUSAL=causal, D_A=d_a, D_B=d_b, D_V=d_v, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, UPCAST=False, stride_lt=1,
    )  # fmt: skip
    constexprs["TMA"] = arch != "sm80"
    if kernel == "fwd":
        constexprs["SCALE_NEG"] = False
    if kernel == "bwd_dq":
        constexprs["HAS_DLSE"] = True
    fp32_ptrs = {"LSE", "DLSE", "DELTA"}
    unaligned = {"stride_lh", "stride_dlt", "stride_dlh", "stride_delh"}  # total_q, h_q
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("CU_"):
            signature[name] = "*i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.isupper():
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in unaligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, constexprs, attrs


# Tiles worth timing when re-tuning on a new GPU (see :func:`tune`).
TUNE_CANDIDATES: dict[str, list[MhaConfig]] = {
    "fwd": [MhaConfig(128, n, 8, s) for n in (32, 64, 128) for s in (2, 3, 4)]
    + [MhaConfig(64, n, 4, s) for n in (64, 128) for s in (2, 3)],
    "bwd_dq": [MhaConfig(128, n, 8, s) for n in (32, 64, 128) for s in (2, 3)]
    + [MhaConfig(64, n, 4, s) for n in (32, 64) for s in (2, 3)],
    "bwd_dkdv": [
        MhaConfig(m, n, w, s) for m in (16, 32, 64) for n, w in ((64, 4), (128, 8)) for s in (2, 3)
    ],
}


def tune(
    p: MhaProblem, kernels: tuple[str, ...] = KERNELS,
    candidates: dict[str, list[MhaConfig]] | None = None,
) -> dict[str, list[tuple[float, MhaConfig]]]:  # fmt: skip
    """Time candidate tiles on problem ``p`` (a CUDA device; offline tuning only, the launchers
    never call it): ``{kernel: [(median ms, config), ...]}`` fastest first. A backward kernel is
    timed through the whole backward with the other kernel at its default (the ranking is what
    matters). Candidates that do not compile or fit (out of resources) are left out. Put the
    winners in ``_TABLE`` and run ``tests/test_mha_compile.py`` (spills, shared memory)."""
    from triton.testing import do_bench

    candidates = candidates or TUNE_CANDIDATES
    out, lse = mha_forward(p)
    dout = torch.randn_like(out)
    runs = {
        "fwd": lambda c: mha_forward(p, c),
        "bwd_dq": lambda c: mha_backward(p, out, lse, dout, None, dq_config=c),
        "bwd_dkdv": lambda c: mha_backward(p, out, lse, dout, None, dkdv_config=c),
    }
    result: dict[str, list[tuple[float, MhaConfig]]] = {}
    for kernel in kernels:
        timed, run = [], runs[kernel]
        for cfg in candidates[kernel]:
            try:
                timed.append((do_bench(lambda c=cfg, r=run: r(c), return_mode="median"), cfg))
            except Exception:  # out of resources / compile failure: not a candidate
                continue
        result[kernel] = sorted(timed, key=lambda t: t[0])
    return result
