"""The SM90 decode family (``kernels/mla_decode_sm90.cu``): wgmma, TMA, warp specialization.

It is the implementation of the ``cuda-sm90`` backend (see :func:`flashmla_cuda.sm90_spec`), which
declares exactly what the kernels handle: compute capability 9.0 and
- dense decode: bf16/fp16 caches with (d_qk, d_v) = (576, 512) and page blocks that are
  multiples of 64;
- sparse decode (``SPARSE`` builds 1 and 2): the FP8 V3.2 / MODEL1 or a bf16 (d_qk 576 or
  512) cache, h_q 64 or 128, attn_sink, topk_length and the extra cache;
- sparse prefill (build 2): d_qk 576 or 512, h_q 64 or 128, attn_sink and topk_length.
The FP8 V3.2 sparse decode at h_q 128 runs as a 2-CTA cluster whose CTAs share the
dequantization. The dense 2-CTA cluster build and the sparse variants (:func:`build_for`) are
used only when ``FLASHMLA_CUDA_SM90_UNVERIFIED`` asks for them
(:func:`flashmla_cuda.unverified_enabled`) until a measurement shows them faster. Every
other case falls through the registry to the next backend, with these reasons. Inputs the
kernels cannot address (misaligned base or strides) run the portable kernels instead, with a
one-time warning.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from flashmla.formats import CacheFormat
from flashmla.problems import (
    DenseDecodeProblem,
    SparseDecodeProblem,
    SparsePrefillProblem,
    row_groups,
)
from flashmla.scheduler import DecodePlan, dense_num_parts, device_sm_count, sparse_num_parts

from . import attention, splitkv, tma, unverified_enabled
from .compiler import Build
from .launch import F32, I32, I64, PTR, TMAP, Launch, kernel, ptr, struct_type

THREADS = 384  # a producer warpgroup and two consumer warpgroups
BLOCK = 64  # query rows per CTA and tokens per key block
TILE = 64 * 576 * 2  # one Q tile or key block in shared memory
# Q, two key stages, the two consumers' row maxima and sums, eight mbarriers, 1024 bytes of
# alignment slack (the kernel traps if given less than its layout)
SMEM_BYTES = 3 * TILE + 2 * 64 * 4 + 2 * 64 * 4 + 8 * 8 + 1024
# Sparse builds: + the valid flags of both stages (FP8: + a 4 KB staging slot per stage half)
SPARSE_SMEM_BYTES = {1: SMEM_BYTES + 2 * BLOCK * 64 + 2 * BLOCK, 2: SMEM_BYTES + 2 * BLOCK}
FP8, ROWS = 1, 2  # the SPARSE builds: FP8 records, bf16 rows

PARAMS = struct_type(
    [("kv", TMAP)]
    + [(name, PTR) for name in (
        "q", "out", "lse", "o_acc", "lse_acc", "block_table", "lengths", "metadata", "num_splits",
        "cache", "cache2", "list2", "lengths2", "sink", "max_logits",
    )]
    + [(name, I64) for name in (
        "q_b", "q_t", "q_h", "o_b", "o_t", "o_h", "l_b", "l_t", "l_h", "table_b", "slot_t",
        "page_stride", "row_stride", "slot2_b", "slot2_t", "page_stride2", "row_stride2",
    )]
    + [(name, I32) for name in (
        "num_pages", "page", "list_len", "s_q", "group", "rows", "h_q", "causal", "num_pages2",
        "page2", "list_len2",
    )]
    + [("scale_log2", F32)]
)  # fmt: skip


def _values(**given) -> dict:
    """Parameter-struct values: ``given``, every other field 0 (a null pointer, an unused
    stride, an all-zero tensor map): the fields one kind of launch does not use."""
    return {**dict.fromkeys(PARAMS.dtype.names, 0), "kv": bytes(128), **given}


def build_for(
    fp16: bool,
    sparse: int = 0,
    cluster: bool = False,
    model1: bool = False,
    d_qk: int = 576,
    unverified: Collection[str] | None = None,
) -> Build:
    """The build of one launch. ``unverified`` (default: the kinds ``FLASHMLA_CUDA_SM90_UNVERIFIED``
    asks for) adds the sparse variants not yet measured faster: ``fp8_pairs`` (FP8, both blocks
    of a pair in flight) where it is not the default, ``pipe`` (the blocks pipelined
    through the two stages instead of the seesaw's pairs) and, with ``pipe``: ``pv_first`` (the
    left consumer's P V before the next Q K^T, which frees each stage earlier),
    ``prefetch_idx`` (each producer thread's index of the next block loaded a block ahead) and
    ``reg_stage`` (FP8: the next block's bytes loaded into registers before its stage is free)."""
    # (2-CTA clusters: dense or FP8 V3.2 sparse, an even grid.x)
    extra = {"CLUSTER": 1} if cluster else {}
    wants = unverified_enabled if unverified is None else unverified.__contains__
    pipe = bool(sparse) and wants("pipe")
    # FP8_PAIRS: measured faster for V3.2 without the cluster (h_q 64: S3 404 -> 366 µs on an
    # H100) and slower with it (S1 +3.5%); MODEL1 not measured. PIPE wants one block at a time.
    if sparse == FP8 and not pipe and (wants("fp8_pairs") or not (cluster or model1)):
        extra["FP8_PAIRS"] = 1
    if pipe:
        extra["PIPE"] = 1
        if wants("pv_first"):
            extra["PV_FIRST"] = 1
        if wants("prefetch_idx"):
            extra["PREFETCH_IDX"] = 1
        if wants("reg_stage") and sparse == FP8:
            extra["REG_STAGE"] = 1
    if model1:  # the FP8 build over the MODEL1 layout (d_qk 512)
        extra["MODEL1"] = 1
    elif d_qk != 576:  # bf16 rows of 512
        extra["D_QK_DIM"] = d_qk
    return Build.of("mla_decode_sm90.cu", DTYPE_FP16=fp16, SPARSE=sparse, **extra)


def builds(cc: tuple[int, int]) -> list[Build]:
    if cc != (9, 0):
        return []
    dense = [build_for(fp16, cluster=c) for fp16 in (False, True) for c in (False, True)]
    sparse = []
    # (the unverified variants: compiled in CI too)
    for unverified in (
        (),
        ("fp8_pairs",),
        ("pipe",),
        ("pipe", "pv_first", "prefetch_idx", "reg_stage"),
    ):
        sparse += [build_for(False, FP8, cluster=c, unverified=unverified) for c in (False, True)]
        sparse += [build_for(False, FP8, model1=True, unverified=unverified)]
        sparse += [build_for(False, ROWS, d_qk=d, unverified=unverified) for d in (576, 512)]
    return [*dense, *dict.fromkeys(sparse)]


def kv_tensor_map(cache: Tensor) -> bytes:
    """The cache ``[pages, page, h_kv, 576]`` as a 4-D map (dim, head, token, page), box of 64
    dims x 1 head x 64 tokens x 1 page. Raises :class:`tma.TensorMapError` if not addressable."""
    pages, page, h_kv, d = cache.shape
    if cache.stride(3) != 1:
        raise tma.TensorMapError("the cache's last dimension must be contiguous")
    size = cache.element_size()
    strides = (cache.stride(2) * size, cache.stride(1) * size, cache.stride(0) * size)
    return tma.encode_tiled(cache.data_ptr(), (d, h_kv, page, pages), strides, (64, 1, 64, 1))


def plan_dense_decode(p: DenseDecodeProblem) -> DecodePlan:
    if p.schedule is not None:
        return DecodePlan.of(p.q, p.schedule)
    rows, h_kv, _ = row_groups(p)
    parts = dense_num_parts(device_sm_count(p.q.device), rows, h_kv)
    schedule = splitkv.schedule(
        b=p.q.shape[0], num_parts=parts, device=p.q.device, seqlens=p.cache_seqlens
    )
    return DecodePlan.of(p.q, schedule)


def dense_decode(p: DenseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    try:
        kv = kv_tensor_map(p.k_cache)
    except tma.TensorMapError as exc:
        attention.warn_once(
            f"the SM90 decode kernel cannot read this cache ({exc}); running the portable kernel"
        )
        return attention.dense_decode(p, plan)
    out, lse = p.empty_outputs()
    with attention.on_device(p.q.device):
        plan = plan if plan is not None else plan_dense_decode(p)
        q = attention.aligned_queries(p.q)
        key = (
            "sm90", attention.layout(q), attention.layout(p.k_cache), attention.layout(p.block_table),
            attention.layout(p.cache_seqlens), p.softmax_scale, p.causal,
        )  # fmt: skip
        pointers = {
            "kv": kv, "q": q.data_ptr(), "out": out.data_ptr(), "lse": lse.data_ptr(),
            "block_table": p.block_table.data_ptr(), "lengths": p.cache_seqlens.data_ptr(),
        }  # fmt: skip
        attention.relaunch(
            plan, key, pointers, lambda: (_launch(p, q, out, lse, kv, plan), q is p.q)
        )  # (a copied q has a pointer of its own: launch anew next time)
    return out, lse


def _launch(p: DenseDecodeProblem, q: Tensor, out: Tensor, lse: Tensor, kv: bytes,
            plan: DecodePlan) -> tuple[Launch, Launch]:  # fmt: skip
    """Run the decode and combine kernels; returns their launches for relaunching."""
    _b, s_q, h_q, _d = q.shape
    rows, h_kv, group = row_groups(p)
    table = p.block_table
    values = _values(**{
        "kv": kv, "q": ptr(q), "out": ptr(out), "lse": ptr(lse), "o_acc": ptr(plan.o_acc),
        "lse_acc": ptr(plan.lse_acc), "block_table": ptr(table), "lengths": ptr(p.cache_seqlens),
        "metadata": ptr(plan.schedule.metadata), "num_splits": ptr(plan.schedule.num_splits),
        "q_b": q.stride(0), "q_t": q.stride(1), "q_h": q.stride(2),
        "o_b": out.stride(0), "o_t": out.stride(1), "o_h": out.stride(2),
        "l_b": lse.stride(0), "l_t": lse.stride(2), "l_h": lse.stride(1),
        "table_b": table.stride(0),
        "num_pages": p.k_cache.shape[0], "page": p.k_cache.shape[1], "list_len": table.shape[1],
        "s_q": s_q, "group": group, "rows": rows, "h_q": h_q, "causal": int(p.causal),
        "scale_log2": p.softmax_scale * attention.LOG2E,
    })  # fmt: skip
    grid = (-(-rows // BLOCK), h_kv, plan.schedule.metadata.shape[0])
    # 2-CTA clusters (the two row tiles of the same keys share their loads): only on request
    # until measured faster (flashmla_cuda.unverified_enabled)
    cluster = grid[0] % 2 == 0 and unverified_enabled("cluster")
    build = build_for(q.dtype == torch.float16, cluster=cluster)
    return _run(build, grid, values, SMEM_BYTES, plan, out, lse, None)


def _launch_kernel(build: Build, grid: tuple[int, int, int], values: dict, smem: int,
                   device: torch.device) -> Launch:  # fmt: skip
    """Launch ``build``'s kernel once; returns the launch (to relaunch with new pointers)."""
    launch = Launch.of(
        kernel(build, "mla_decode_sm90", device), grid, THREADS, PARAMS, values, smem
    )
    launch.run()
    return launch


def _run(build: Build, grid: tuple[int, int, int], values: dict, smem: int, plan: DecodePlan,
         out: Tensor, lse: Tensor, sink: Tensor | None) -> tuple[Launch, Launch]:  # fmt: skip
    """Launch the decode kernel and the combine of its split requests; returns both launches."""
    decode = _launch_kernel(build, grid, values, smem, out.device)
    combine = splitkv.combine(
        o_acc=plan.o_acc, lse_acc=plan.lse_acc, num_splits=plan.schedule.num_splits, out=out,
        lse=lse, lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)), sink=sink,
    )  # fmt: skip
    return decode, combine


# --------------------------------------------------------------------------------------------
# Sparse decode (FP8 V3.2 / MODEL1 and bf16 caches)


def plan_sparse_decode(p: SparseDecodeProblem) -> DecodePlan:
    if p.schedule is not None:
        return DecodePlan.of(p.q, p.schedule)
    b, s_q, h_q, _ = p.q.shape
    extra = p.extra_indices
    schedule = splitkv.schedule(
        b=b, num_parts=sparse_num_parts(device_sm_count(p.q.device), s_q, h_q),
        device=p.q.device, topk=p.indices.shape[2], topk_length=p.topk_length,
        extra_topk=None if extra is None else extra.shape[2],
        extra_topk_length=p.extra_topk_length,
    )  # fmt: skip
    return DecodePlan.of(p.q, schedule)


def _unaddressable(cache: Tensor, indices: Tensor, planar: bool = False) -> str | None:
    """Why the sparse kernels cannot read a cache ``[pages, page, 1, row]`` and index lists as
    they are laid out (None: they can): rows are copied in 16-byte pieces. ``planar``: the
    MODEL1 layout, whose token rows are 576 bytes apart whatever the view says."""
    size = cache.element_size()
    strides = cache.stride()[: 1 if planar else 2]
    if cache.data_ptr() % 16 or any((st * size) % 16 for st in strides):
        return "the cache's base, page and token strides must be multiples of 16 bytes"
    if cache.stride(3) != 1:
        return "the cache's rows must be contiguous"
    if indices.stride(2) != 1:
        return "the indices' last dimension must be contiguous"
    return None


def _sparse_unaddressable(p: SparseDecodeProblem) -> str | None:
    planar = p.cache_format == CacheFormat.FP8_MODEL1
    why = _unaddressable(p.k_cache, p.indices, planar)
    if why is None and p.extra_k_cache is not None:
        why = _unaddressable(p.extra_k_cache, p.extra_indices, planar)
    return why


def sparse_decode(p: SparseDecodeProblem, plan: DecodePlan | None) -> tuple[Tensor, Tensor]:
    why = _sparse_unaddressable(p)
    if why is not None:
        attention.warn_once(f"the SM90 sparse decode kernel cannot read this input ({why}); "
                            "running the portable kernel")  # fmt: skip
        return attention.sparse_decode(p, plan)
    out, lse = p.empty_outputs()
    with attention.on_device(p.q.device):
        plan = plan if plan is not None else plan_sparse_decode(p)
        q = attention.aligned_queries(p.q)
        extra = (p.extra_k_cache, p.extra_indices, p.extra_topk_length)
        key = (
            "sm90-sparse", attention.layout(q), attention.layout(p.k_cache),
            attention.layout(p.indices), attention.layout(p.topk_length),
            attention.layout(p.attn_sink), p.softmax_scale, *map(attention.layout, extra),
        )  # fmt: skip
        pointers = {
            "q": q.data_ptr(), "out": out.data_ptr(), "lse": lse.data_ptr(),
            "cache": p.k_cache.data_ptr(), "block_table": p.indices.data_ptr(),
            "lengths": ptr(p.topk_length), "sink": ptr(p.attn_sink),
            "cache2": ptr(extra[0]), "list2": ptr(extra[1]), "lengths2": ptr(extra[2]),
        }  # fmt: skip
        attention.relaunch(
            plan, key, pointers, lambda: (_launch_sparse(p, q, out, lse, plan), q is p.q)
        )
    return out, lse


def _extra_values(p: SparseDecodeProblem, model1: bool) -> dict[str, int]:
    """The extra cache's fields of the parameter struct (zeros without one)."""
    cache, indices = p.extra_k_cache, p.extra_indices
    if cache is None:
        return {}
    size = cache.element_size()
    return {
        "cache2": ptr(cache), "list2": ptr(indices), "lengths2": ptr(p.extra_topk_length),
        "slot2_b": indices.stride(0), "slot2_t": indices.stride(1),
        "page_stride2": cache.stride(0) * size,
        "row_stride2": 576 if model1 else cache.stride(1) * size,
        "num_pages2": cache.shape[0], "page2": cache.shape[1], "list_len2": indices.shape[2],
    }  # fmt: skip


def _launch_sparse(p: SparseDecodeProblem, q: Tensor, out: Tensor, lse: Tensor,
                   plan: DecodePlan) -> tuple[Launch, Launch]:  # fmt: skip
    _b, s_q, h_q, _d = q.shape
    cache, indices, sink = p.k_cache, p.indices, p.attn_sink
    model1 = p.cache_format == CacheFormat.FP8_MODEL1
    build = ROWS if p.cache_format == CacheFormat.BF16 else FP8
    values = _values(**{
        "q": ptr(q), "out": ptr(out), "lse": ptr(lse), "o_acc": ptr(plan.o_acc),
        "lse_acc": ptr(plan.lse_acc), "block_table": ptr(indices), "lengths": ptr(p.topk_length),
        "metadata": ptr(plan.schedule.metadata), "num_splits": ptr(plan.schedule.num_splits),
        "cache": ptr(cache), "sink": ptr(sink), **_extra_values(p, model1),
        "q_b": q.stride(0), "q_t": q.stride(1), "q_h": q.stride(2),
        "o_b": out.stride(0), "o_t": out.stride(1), "o_h": out.stride(2),
        "l_b": lse.stride(0), "l_t": lse.stride(2), "l_h": lse.stride(1),
        "table_b": indices.stride(0), "slot_t": indices.stride(1),
        "page_stride": cache.stride(0) * cache.element_size(),
        "row_stride": 576 if model1 else cache.stride(1) * cache.element_size(),
        "num_pages": cache.shape[0], "page": cache.shape[1], "list_len": indices.shape[2],
        "s_q": s_q, "group": h_q, "rows": h_q, "h_q": h_q,
        "scale_log2": p.softmax_scale * attention.LOG2E,
    })  # fmt: skip
    grid = (h_q // BLOCK, s_q, plan.schedule.metadata.shape[0])
    # the two head tiles of h_q = 128 as a cluster sharing the dequantization (V3.2 only)
    cluster = build == FP8 and not model1 and h_q == 2 * BLOCK
    kernel_build = build_for(False, build, cluster=cluster, model1=model1, d_qk=q.shape[-1])
    return _run(kernel_build, grid, values, SPARSE_SMEM_BYTES[build], plan, out, lse, sink)


# --------------------------------------------------------------------------------------------
# Sparse prefill (bf16 kv, d_qk 576 or 512): the ROWS build, each query token a "request" over
# the kv rows seen as one-token pages, without split-KV.


def prefill_metadata(s_q: int, parts: int, device: torch.device) -> Tensor:
    """Schedule rows giving part i the whole requests [i k, (i + 1) k), k = ceil(s_q / parts):
    ``[begin_req, end_req (inclusive), begin_blk 0, end_blk (no limit), 0, 0, 0, 0]``."""
    k = -(-s_q // parts)
    begin = torch.arange(0, s_q, k, dtype=torch.int32, device=device)
    md = torch.zeros((begin.shape[0], 8), dtype=torch.int32, device=device)
    md[:, 0] = begin
    md[:, 1] = (begin + k).clamp(max=s_q) - 1
    md[:, 3] = 1 << 30
    return md


def sparse_prefill(p: SparsePrefillProblem) -> tuple[Tensor, Tensor, Tensor]:
    why = _unaddressable(p.kv.unsqueeze(1), p.indices)
    if why is not None:
        attention.warn_once(f"the SM90 sparse prefill kernel cannot read this input ({why}); "
                            "running the portable kernel")  # fmt: skip
        return attention.sparse_prefill(p)
    out, max_logits, lse = p.empty_outputs()
    assert max_logits.stride() == lse.stride()  # the kernel writes both at lse's offsets
    s_q, h_q, _d = p.q.shape
    with attention.on_device(p.q.device):
        q = attention.aligned_queries(p.q)
        md = prefill_metadata(s_q, max(device_sm_count(q.device) // (h_q // BLOCK), 1), q.device)
        kv, indices = p.kv, p.indices
        values = _values(**{
            "q": ptr(q), "out": ptr(out), "lse": ptr(lse), "block_table": ptr(indices),
            "lengths": ptr(p.topk_length), "metadata": ptr(md), "cache": ptr(kv),
            "sink": ptr(p.attn_sink), "max_logits": ptr(max_logits),  # (at lse's offsets)
            "q_b": q.stride(0), "q_h": q.stride(1), "o_b": out.stride(0), "o_h": out.stride(1),
            "l_b": lse.stride(0), "l_h": lse.stride(1), "table_b": indices.stride(0),
            "page_stride": kv.stride(0) * 2, "row_stride": kv.stride(0) * 2,
            "num_pages": kv.shape[0], "page": 1, "list_len": indices.shape[2],
            "s_q": 1, "group": h_q, "rows": h_q, "h_q": h_q,
            "scale_log2": p.sm_scale * attention.LOG2E,
        })  # fmt: skip
        grid = (h_q // BLOCK, 1, md.shape[0])
        build = build_for(False, ROWS, d_qk=q.shape[-1])
        _launch_kernel(build, grid, values, SPARSE_SMEM_BYTES[ROWS], q.device)
    return out, max_logits, lse
