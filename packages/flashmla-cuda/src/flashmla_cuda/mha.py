"""Dense MHA prefill (varlen, bottom-right causal, GQA) forward and backward: launchers of
``kernels/mha.cu``.

``mha_forward(p) -> (out, lse)`` and ``mha_backward(p, out, lse, dout, dlse) -> (dq, dk, dv)``.
Semantics (as the reference and the Triton backend): a query row that sees no key (causal with
``L_q > L_k``, or ``L_k = 0``) gets ``out = 0``, ``lse = +inf`` and zero gradients; rows past
``cu_seqlens[-1]`` are not written; the backward honours ``dlse`` and is bitwise deterministic
(no atomics: dQ and dK/dV come from separate kernels, dK/dV sum the GQA group in a fixed order).

One build per (head dims, dtype) holds the four kernels (forward, backward preprocessing, dQ,
dK/dV); causal masking, the GQA group and the scale are run-time parameters. Tiles are fixed per
head dims (:data:`TILES`); every one fits 99 KiB of shared memory, so the same builds serve every
compute capability from 8.0 on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flashmla.problems import MhaProblem

from .compiler import Build
from .launch import F32, I32, I64, PTR, kernel, pack, ptr, struct_type

HEAD_DIMS = ((128, 128), (192, 128), (64, 64), (128, 64))  # keep in sync with __init__.spec()
LOG2E = 1.4426950408889634
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class MhaTiles:
    """Tile sizes of the kernels. Warps: ``fwd_bm / (16 * fwd_mw)`` (forward), ``dq_bm / 16``
    (dQ), ``kv_bn / 16`` (dK/dV); a warp owns 16 * fwd_mw queries in the forward, 16 queries in
    dQ, 16 keys in dK/dV."""

    fwd_bm: int  # queries per forward CTA
    fwd_bn: int  # keys per forward tile
    fwd_mw: int  # 16-row m-tiles per forward warp (2: Q re-read from shared memory per tile)
    dq_bm: int  # queries per dQ CTA
    dq_bn: int  # keys per dQ tile
    dq_qreg: bool  # dQ keeps Q's fragments in registers
    kv_bn: int  # keys per dK/dV CTA
    kv_bm: int  # queries per dK/dV tile

    def defines(self) -> dict[str, int]:
        return dict(
            FWD_BM=self.fwd_bm, FWD_BN=self.fwd_bn, FWD_MW=self.fwd_mw, DQ_BM=self.dq_bm,
            DQ_BN=self.dq_bn, DQ_QREG=int(self.dq_qreg), KV_BN=self.kv_bn, KV_BM=self.kv_bm,
        )  # fmt: skip

    def threads(self) -> tuple[int, int, int]:
        """Threads per CTA of the forward, dQ and dK/dV kernels."""
        return self.fwd_bm // self.fwd_mw * 2, self.dq_bm * 2, self.kv_bn * 2

    # Dynamic shared memory in bytes (mirrors F_SMEM, DQ_SMEM, KV_SMEM in mha.cu).
    def fwd_smem(self, d_qk: int, d_v: int) -> int:
        stage, q = self.fwd_bn * (d_qk + d_v), self.fwd_bm * d_qk
        return 2 * (stage + max(stage, q)) if self.fwd_mw == 1 else 2 * (q + 2 * stage)

    def dq_smem(self, d_qk: int, d_v: int) -> int:
        return 2 * (self.dq_bm * (d_qk + d_v) + 2 * self.dq_bn * (d_qk + d_v))

    def kv_smem(self, d_qk: int, d_v: int) -> int:
        stage = self.kv_bm * (d_qk + d_v) + 2 * self.kv_bm * 2
        return 2 * (self.kv_bn * (d_qk + d_v) + 2 * stage)


# Per (d_qk, d_v). Forward: 4 warps of 32 queries (two m16 tiles share every K/V fragment read
# from shared memory, whose bandwidth bounds mma.sync attention) against 32- or 64-key tiles.
# Backward: 4 warps of 16 queries (dQ) / 16 keys (dK/dV) so that two CTAs share an SM (~255
# registers per thread: the dK + dV accumulators alone take 160 of them at d_qk = 192, and dQ
# re-reads Q's fragments there: keeping them spills on sm_100a). Every
# kernel stays below 99 KiB of shared memory (the sm_86 / sm_89 / sm_120 limit) and spills
# nothing on sm_80 / sm_90a / sm_100a (tests/test_mha_host.py checks both).
TILES: dict[tuple[int, int], MhaTiles] = {
    (192, 128): MhaTiles(128, 32, 2, 64, 32, False, 64, 32),
    (128, 128): MhaTiles(128, 32, 2, 64, 32, True, 64, 32),
    (128, 64): MhaTiles(128, 64, 2, 64, 64, True, 64, 64),
    (64, 64): MhaTiles(128, 64, 2, 64, 64, True, 64, 64),
}
assert set(TILES) == set(HEAD_DIMS)


def build(d_qk: int, d_v: int, dtype: torch.dtype, tiles: MhaTiles | None = None) -> Build:
    """The build holding every MHA kernel for these head dims and element type."""
    if (d_qk, d_v) not in TILES:
        raise ValueError(f"no CUDA MHA kernels for (d_qk, d_v) = ({d_qk}, {d_v})")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"CUDA MHA kernels take bf16 or fp16, got {dtype}")
    tiles = tiles or TILES[(d_qk, d_v)]
    return Build.of(
        "mha.cu", D_QK=d_qk, D_V=d_v, DTYPE_FP16=dtype == torch.float16, **tiles.defines()
    )


def builds(cc: tuple[int, int]) -> list[Build]:
    """Every build the launchers use on compute capability ``cc`` (the same for all)."""
    return [build(*dims, dtype) for dims in HEAD_DIMS for dtype in (torch.bfloat16, torch.float16)]


# ---------------------------------------------------------------------------------------------
# Parameter structs (mirror mha.cu field by field)


def _fields(spec: str) -> list[tuple[str, type]]:
    """``"ptr: a b; i64: c"`` -> ``[("a", PTR), ("b", PTR), ("c", I64)]``."""
    kinds = {"ptr": PTR, "i64": I64, "i32": I32, "f32": F32}
    fields = []
    for group in spec.split(";"):
        kind, names = group.split(":")
        fields += [(name, kinds[kind.strip()]) for name in names.split()]
    return fields


FWD_PARAMS = struct_type(
    _fields(
        "ptr: q k v o lse cu_q cu_k;"
        "i64: q_row q_head k_row k_head v_row v_head o_row o_head lse_row lse_head;"
        "i32: group causal neg_scale b0; f32: scale_log2"
    )
)
PREP_PARAMS = struct_type(
    _fields(
        "ptr: o dout lse dlse delta lse2;"
        "i64: o_row o_head do_row do_head lse_row lse_head dlse_row dlse_head; i32: total_q h_q"
    )
)
BWD_PARAMS = struct_type(
    _fields(
        "ptr: q k v dout lse2 delta dq dk dv cu_q cu_k;"
        "i64: q_row q_head k_row k_head v_row v_head do_row do_head dq_row dq_head dk_row dk_head"
        " dv_row dv_head; i32: total_q group causal b0; f32: scale scale_log2"
    )
)
PREP_THREADS = 256


def _strides(prefix: str, t: Tensor) -> dict[str, int]:
    return {f"{prefix}_row": t.stride(0), f"{prefix}_head": t.stride(1)}


def _tile_ready(t: Tensor) -> Tensor:
    """``t`` if the kernels can copy its rows in 16-byte pieces (16-byte aligned base, unit last
    stride, other strides multiples of 8 elements), else a packed copy."""
    ok = t.data_ptr() % 16 == 0 and t.stride(-1) == 1
    ok = ok and all(s % 8 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _batches(b: int) -> range:
    """First sequence of each launch: grid z is at most 65535."""
    return range(0, b, MAX_GRID_YZ)


def _check_grid(h: int) -> None:
    if h > MAX_GRID_YZ:
        raise ValueError(f"CUDA MHA kernels take at most {MAX_GRID_YZ} heads, got {h}")


def mha_forward(p: MhaProblem) -> tuple[Tensor, Tensor]:
    """``out`` (q's dtype, ``[total_q, h_q, d_v]``) and ``lse`` (float32, natural log, stride
    ``(1, total_q)``)."""
    q, k, v = (_tile_ready(t) for t in (p.q, p.k, p.v))
    _, h_q, d_qk = q.shape
    h_kv, d_v = k.shape[1], v.shape[2]
    out, lse = p.empty_outputs()
    tiles = TILES[(d_qk, d_v)]
    grid_x = math.ceil(p.max_seqlen_q / tiles.fwd_bm)
    if grid_x == 0 or p.batch == 0 or out.numel() == 0:
        return out, lse
    _check_grid(h_q)
    fn = kernel(build(d_qk, d_v, q.dtype), "mha_fwd", q.device)
    scale = p.softmax_scale
    # |scale| with Q negated in the kernel (exact) keeps "max of the raw scores" a max; the
    # floor keeps -inf * scale = -inf for a zero scale.
    base = dict(
        q=ptr(q), k=ptr(k), v=ptr(v), o=ptr(out), lse=ptr(lse),
        cu_q=ptr(p.cu_seqlens_q), cu_k=ptr(p.cu_seqlens_k),
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("o", out),
        **_strides("lse", lse), group=h_q // h_kv, causal=int(p.causal),
        neg_scale=int(scale < 0), scale_log2=max(abs(scale) * LOG2E, 1e-30),
    )  # fmt: skip
    threads, smem = tiles.threads()[0], tiles.fwd_smem(d_qk, d_v)
    for b0 in _batches(p.batch):
        nb = min(MAX_GRID_YZ, p.batch - b0)
        fn((grid_x, h_q, nb), threads, pack(FWD_PARAMS, {**base, "b0": b0}), smem)
    return out, lse


def mha_backward(
    p: MhaProblem, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (q's dtype) given ``dout`` and, optionally, ``dlse`` (d lse / d S =
    P: it enters as ``dS = P * (dP - (rowsum(dO * O) - dlse))``)."""
    q, k, v = (_tile_ready(t) for t in (p.q, p.k, p.v))
    total_q, h_q, d_qk = q.shape
    total_k, h_kv, _ = k.shape
    d_v = v.shape[2]
    tiles = TILES[(d_qk, d_v)]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grid_q = math.ceil(p.max_seqlen_q / tiles.dq_bm)
    grid_k = math.ceil(p.max_seqlen_k / tiles.kv_bn)
    run_q = p.batch > 0 and grid_q > 0 and total_q > 0
    run_k = p.batch > 0 and grid_k > 0 and total_k > 0
    if not run_q:  # no query row in any sequence
        dq.zero_()
    if not run_k:
        dk.zero_()
        dv.zero_()
    if not (run_q or run_k):
        return dq, dk, dv
    _check_grid(h_q)
    # autograd may hand over expanded (stride-0) or fp32 gradients
    out = _tile_ready(out if out.dtype == q.dtype else out.to(q.dtype))
    dout = _tile_ready(dout if dout.dtype == q.dtype else dout.to(q.dtype))
    lse = lse.float()
    dlse = dlse.float() if dlse is not None else None
    bld = build(d_qk, d_v, q.dtype)

    # delta = rowsum(dO * O) - dlse and lse * log2(e), each [h_q, total_q]
    aux = torch.empty((2, h_q, total_q), dtype=torch.float32, device=q.device)
    rows = total_q * h_q
    if rows:
        prep = dict(
            o=ptr(out), dout=ptr(dout), lse=ptr(lse), dlse=ptr(dlse), delta=ptr(aux[0]),
            lse2=ptr(aux[1]), **_strides("o", out), **_strides("do", dout),
            **_strides("lse", lse),
            dlse_row=dlse.stride(0) if dlse is not None else 0,
            dlse_head=dlse.stride(1) if dlse is not None else 0,
            total_q=total_q, h_q=h_q,
        )  # fmt: skip
        rows_per_cta = PREP_THREADS // (d_v // 8)
        kernel(bld, "mha_bwd_prep", q.device)(
            (math.ceil(rows / rows_per_cta),), PREP_THREADS, pack(PREP_PARAMS, prep)
        )

    base = dict(
        q=ptr(q), k=ptr(k), v=ptr(v), dout=ptr(dout), lse2=ptr(aux[1]), delta=ptr(aux[0]),
        dq=ptr(dq), dk=ptr(dk), dv=ptr(dv), cu_q=ptr(p.cu_seqlens_q), cu_k=ptr(p.cu_seqlens_k),
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("do", dout),
        **_strides("dq", dq), **_strides("dk", dk), **_strides("dv", dv),
        total_q=total_q, group=h_q // h_kv, causal=int(p.causal),
        scale=p.softmax_scale, scale_log2=p.softmax_scale * LOG2E,
    )  # fmt: skip
    dq_fn = kernel(bld, "mha_bwd_dq", q.device)
    kv_fn = kernel(bld, "mha_bwd_dkdv", q.device)
    for b0 in _batches(p.batch):
        params = pack(BWD_PARAMS, {**base, "b0": b0})
        nb = min(MAX_GRID_YZ, p.batch - b0)
        if run_k:  # a key block with no visible query writes zeros itself
            kv_fn((grid_k, h_kv, nb), tiles.threads()[2], params, tiles.kv_smem(d_qk, d_v))
        if run_q:
            dq_fn((grid_q, h_q, nb), tiles.threads()[1], params, tiles.dq_smem(d_qk, d_v))
    return dq, dk, dv
