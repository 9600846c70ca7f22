"""Dense MHA prefill (varlen, bottom-right causal, GQA) forward and backward: Triton launchers.

``mha_forward(p) -> (out, lse)`` and ``mha_backward(p, out, lse, dout, dlse) -> (dq, dk, dv)``;
the kernels are in :mod:`flashmla_triton.kernels.mha`.

Semantics beyond FlashMLA's contract (§3), documented here:
- a query row that sees no key (causal with ``L_q > L_k``, or ``L_k = 0``) gets ``out = 0`` and
  ``lse = +inf``; its gradients are 0 (``P = exp(s - lse) = 0``).
- GQA is supported in the backward too (dK/dV sum the group's query heads, deterministically).
- the backward is bitwise deterministic (no atomics); ``dlse`` (may be None) is honoured.
- rows past ``cu_seqlens[-1]`` (if the tensors are longer) are not written, as in FlashMLA.

Launch configurations are fixed per ``(d_qk, d_v, causal)`` (no autotuning: it would run on the
first call, time kernels inside CUDA-graph capture and cannot run under the interpreter);
:func:`configs` lists them so tests can compile each ahead of time.
"""

from __future__ import annotations

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


# (kernel, d_qk, d_v, causal) -> config. Hopper-oriented: BLOCK_M 128 (two warpgroups of wgmma
# M=64), register use checked by tests/test_mha_compile.py (no spills on sm_80/sm_90).
_CONFIGS: dict[tuple[str, int, int, bool], MhaConfig] = {}
for _causal in (False, True):
    for _dqk, _dv in HEAD_DIMS:
        _CONFIGS["fwd", _dqk, _dv, _causal] = MhaConfig(128, 64 if _dqk == 192 else 128, 8, 2)
        _CONFIGS["bwd_dq", _dqk, _dv, _causal] = MhaConfig(128, 64, 8, 2)
        _CONFIGS["bwd_dkdv", _dqk, _dv, _causal] = MhaConfig(64, 128, 8, 2)


def configs() -> dict[tuple[str, int, int, bool], MhaConfig]:
    """Every launch configuration used, keyed by ``(kernel, d_qk, d_v, causal)`` where kernel is
    ``"fwd"``, ``"bwd_dq"`` or ``"bwd_dkdv"``."""
    return dict(_CONFIGS)


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
    key = (kernel, p.q.shape[2], p.v.shape[2], p.causal)
    if key not in _CONFIGS:
        raise ValueError(f"no Triton MHA config for (d_qk, d_v) = {key[1:3]}")
    return _CONFIGS[key]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def mha_forward(p: MhaProblem, config: MhaConfig | None = None) -> tuple[Tensor, Tensor]:
    q, k, v = p.q, p.k, p.v
    _, h_q, d_qk = q.shape
    h_kv, d_v = k.shape[1], v.shape[2]
    d_a, d_b = _split(d_qk)
    cfg = _config("fwd", p, config)
    out, lse = p.empty_outputs()
    grid = (triton.cdiv(p.max_seqlen_q, cfg.block_m), h_q, p.batch)
    if 0 in grid or out.numel() == 0:
        return out, lse
    _k.mha_fwd_kernel[grid](
        q, k, v, out, lse, p.cu_seqlens_q, p.cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        p.softmax_scale * _k.LOG2E.value,
        GROUP=h_q // h_kv, CAUSAL=p.causal, SCALE_NEG=p.softmax_scale < 0,
        D_A=d_a, D_B=d_b, D_V=d_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def mha_backward(
    p: MhaProblem, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    dq_config: MhaConfig | None = None, dkdv_config: MhaConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of q, k, v (in q's dtype) given ``dout`` and, optionally, ``dlse``."""
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
            scale, scale * _k.LOG2E.value, HAS_DLSE=dlse is not None, **common,
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
            scale, scale * _k.LOG2E.value, **common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dq, dk, dv



def aot_source_args(kernel: str, d_qk: int, d_v: int, causal: bool, dtype: str = "bf16",
                    group: int = 1) -> tuple[Any, dict[str, str], dict[str, Any], dict]:  # fmt: skip
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource``: the kernel as
    :func:`mha_forward` / :func:`mha_backward` launch it for contiguous inputs (pointers and
    strides divisible by 16, lse's unit stride specialised, as Triton's JIT does)."""
    cfg = _CONFIGS[kernel, d_qk, d_v, causal]
    d_a, d_b = _split(d_qk)
    fn = {"fwd": _k.mha_fwd_kernel, "bwd_dq": _k.mha_bwd_dq_kernel,
          "bwd_dkdv": _k.mha_bwd_dkdv_kernel}[kernel]  # fmt: skip
    constexprs: dict[str, Any] = dict(
        GROUP=group, CAUSAL=causal, D_A=d_a, D_B=d_b, D_V=d_v, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, UPCAST=False, stride_lt=1,
    )
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
