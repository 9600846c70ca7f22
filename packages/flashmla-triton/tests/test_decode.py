"""Triton decode pieces in the interpreter: the scheduler kernel, the combine kernel, and proof
that the interpreter's bf16 trap is real and handled (run with TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import random

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests: set TRITON_INTERPRET=1", allow_module_level=True)

from flashmla_triton import decode
from flashmla_triton.kernels.combine import combine_kernel
from flashmla_triton.kernels.schedule import schedule_kernel

import flashmla
from flashmla import scheduler, testing


def _run_schedule(lengths, parts, *, topk_len=None, extra_len=None, topk=0, extra_topk=None):
    b = lengths.shape[0] if lengths is not None else topk_len.shape[0]
    md = torch.full((parts, 8), -7, dtype=torch.int32)
    ns = torch.full((b + 1,), -7, dtype=torch.int32)
    sparse = lengths is None
    schedule_kernel[(1,)](
        lengths if not sparse else topk_len, topk_len, extra_len, b, topk, extra_topk or 0, parts,
        md, ns, SPARSE=sparse, HAS_TOPK_LEN=topk_len is not None, HAS_EXTRA=extra_topk is not None,
        HAS_EXTRA_LEN=extra_len is not None, OVERHEAD=scheduler.OVERHEAD_BLOCKS, CHUNK=16,
    )  # fmt: skip
    return md, ns


@pytest.mark.parametrize("seed", range(40))
def test_schedule_kernel_matches_core(seed):
    rng = random.Random(seed)
    b, parts = rng.randint(1, 40), rng.randint(1, 12)
    picks = [0, 1, 63, 64, 65, 127, 128, 4096]
    lengths = torch.tensor(
        [rng.choice([*picks, rng.randint(0, 5000)]) for _ in range(b)], dtype=torch.int32
    )
    md, ns = _run_schedule(lengths, parts)
    want = scheduler.split_kv_schedule(lengths, parts)
    assert torch.equal(md, want.metadata) and torch.equal(ns, want.num_splits)


@pytest.mark.parametrize("seed", range(20))
def test_schedule_kernel_sparse_lengths(seed):
    rng = random.Random(seed)
    b, parts, topk = rng.randint(1, 20), rng.randint(1, 9), rng.choice([64, 128, 2048])
    topk_len = torch.tensor([rng.randint(0, topk) for _ in range(b)], dtype=torch.int32)
    extra_topk = rng.choice([None, 64, 512])
    extra_len = None
    if extra_topk and rng.random() < 0.5:
        extra_len = torch.tensor([rng.randint(0, extra_topk) for _ in range(b)], dtype=torch.int32)
    md, ns = _run_schedule(
        None, parts, topk_len=topk_len, extra_len=extra_len, topk=topk, extra_topk=extra_topk
    )
    lengths = scheduler.sparse_lengths(
        topk, topk_len, extra_topk, extra_len, b, torch.device("cpu")
    )
    want = scheduler.split_kv_schedule(lengths, parts)
    assert torch.equal(md, want.metadata) and torch.equal(ns, want.num_splits)


@pytest.mark.parametrize("sink", [False, True])
def test_combine_kernel_matches_core(sink):
    g = torch.Generator().manual_seed(3)
    b, s_q, h_q, parts = 3, 2, 5, 4
    ns = torch.tensor([0, 1, 4, 6], dtype=torch.int32)  # request 0 unsplit (skipped), 1: 3 pieces
    slots = b + parts
    o_acc = torch.randn(slots, s_q, h_q, 512, generator=g)
    lse_acc = torch.randn(slots, s_q, h_q, generator=g) * 3
    lse_acc[4, 0, 1] = float("-inf")  # an empty piece
    lse_acc[5, :, 2] = float("-inf")  # request 2 fully empty for head 2
    lse_acc[4, :, 2] = float("-inf")
    attn_sink = torch.tensor([0.5, float("inf"), float("-inf"), -1.0, 2.0]) if sink else None
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.bfloat16)
    lse = torch.zeros(b, h_q, s_q)
    # BLOCK_S = 2 < 3 pieces: the piece loop takes more than one step
    combine_kernel[(b * s_q, h_q, 512 // 128)](
        o_acc, lse_acc, s_q * h_q, h_q, 1, ns, out, *out.stride()[:3], lse, lse.stride(0),
        lse.stride(2), lse.stride(1), attn_sink, s_q, h_q,
        HAS_SINK=sink, BLOCK_S=2, BLOCK_D=128, D_V=512, UPCAST=True,
    )  # fmt: skip
    want_out, want_lse = scheduler.combine_splits(o_acc, lse_acc, ns, attn_sink)
    for i in (1, 2):  # request 0 has one piece: the attention kernel writes it, combine skips it
        testing.assert_close("out", out[i], want_out[i], (1e-2, 2.01 / 128, 1e-5))
        testing.assert_close("lse", lse[i], want_lse[i].transpose(0, 1), (1e-5, 1e-5, 1e-7))
    assert (out[0] == 0).all()


def test_interpreter_bf16_trap_is_real_and_handled():
    """Without the fp32 upcast, the interpreter multiplies raw bf16 bits in tl.dot and the
    result is garbage; the launchers upcast when interpreting, which this proves necessary."""
    inputs = testing.dense_decode_inputs(1, 1, 16, 64, seed=5)
    p = testing.problem_for("decode", inputs)
    ref_out, _ = testing.reference("decode", inputs)
    tol = testing.TOLERANCES["dense_decode"]["out"]
    plan = decode.plan_dense_decode(p)
    for upcast in (True, False):
        out, lse = p.empty_outputs()
        launches = decode.dense_decode_launches(p, plan, out, lse)
        for launch in launches:
            launch.args["UPCAST"] = upcast
            launch()
        problems = testing.compare(out, ref_out, *tol)
        assert (not problems) if upcast else problems, (upcast, problems)


def test_backend_is_dispatched_in_interpreter():
    inputs = testing.dense_decode_inputs(1, 1, 16, 64, seed=6)
    with flashmla.use_backend("triton"):
        out, _lse = flashmla.flash_mla_with_kvcache(**inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["dense", "dense-bulk-copy", "fp8", "sparse-extra"])
def test_layers_sharing_a_schedmeta(kind):
    """One SchedMeta per decoding step, several layers with their own caches: launches are
    built once per step and rebound to each layer's tensors (bulk-copy descriptors included)."""
    meta = flashmla.get_mla_metadata()[0]
    for layer in range(3):
        if kind == "dense":
            inputs = testing.dense_decode_inputs(
                2, 2, 16, 0, causal=True, seqlens=[100, 140], seed=layer
            )
        elif kind == "dense-bulk-copy":
            inputs = testing.dense_decode_inputs(2, 1, 16, 0, seqlens=[128, 300], seed=layer)
        elif kind == "fp8":
            inputs = testing.dense_decode_inputs(
                2,
                1,
                16,
                0,
                cache_format="fp8_v32",
                page_block_size=32,
                seqlens=[90, 60],
                seed=layer,
            )
        else:
            inputs = testing.sparse_decode_inputs(
                2, 1, 16, 32, s_k=100, cache_format="fp8_model1", page_block_size=61, varlen=False,
                topk_length=True, attn_sink=True, extra_topk=32, extra_page_block_size=8, seed=layer,
            )  # fmt: skip
        want = testing.reference("decode", inputs)
        with flashmla.use_backend("triton"):
            out, lse = flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=meta))
        tol = testing.TOLERANCES["sparse_decode" if kind.startswith("sparse") else "dense_decode"]
        testing.assert_close("out", out, want[0], tol["out"])
        testing.assert_close("lse", lse, want[1], tol["lse"])
    assert len(meta.plans["triton"].launches) == 1  # built once, reused by every layer
