"""Public API semantics: lazy SchedMeta, old-form metadata, output layouts, defaults, the packed
MHA variants and MHA autograd (contract §1-3, §13)."""

from __future__ import annotations

import inspect
import math
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import flashmla
from flashmla import ops, problems, registry, testing
from flashmla.formats import CacheFormat
from flashmla.registry import REGISTRY, BackendSpec, OpSupport
from flashmla.scheduler import DecodeConfig, SchedMeta, Schedule, split_kv_schedule

# --------------------------------------------------------------------------------------------
# A backend that counts its planner calls (it computes through the reference backend)


class Counting(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("_flashmla_test_counting")
        self.plans: list[Any] = []  # every plan the planners returned
        self.seen: list[tuple[Any, Any]] = []  # (problem, plan) of every call

    def plan_dense_decode(self, p):
        plan = split_kv_schedule(p.cache_seqlens, 4)
        self.plans.append(plan)
        return plan

    def plan_sparse_decode(self, p):
        plan = object()  # any object: the backend decides what a plan is
        self.plans.append(plan)
        return plan

    def dense_decode(self, p, plan):
        from flashmla_ref import ops as ref

        self.seen.append((p, plan))
        return ref.dense_decode(p, plan)

    def sparse_decode(self, p, plan):
        from flashmla_ref import ops as ref

        self.seen.append((p, plan))
        return ref.sparse_decode(p, plan)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counting]:
    module = Counting()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.delenv(registry.ENV_BACKEND, raising=False)
    every = OpSupport(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        features=frozenset(
            {"mtp", "causal", "attn_sink", "topk_length", "extra_cache", "extra_topk_length"}
        ),
    )
    spec = BackendSpec(
        "counting",
        "0",
        module.__name__,
        {"dense_decode": every, "sparse_decode": every},
        priority=100,
    )
    REGISTRY.reload()
    flashmla.register_backend(spec)
    yield module
    REGISTRY.reload()


def dense(**kw: Any) -> dict[str, Any]:
    args = dict(b=2, s_q=2, h_q=4, s_k=40, page_block_size=16, causal=True)
    args.update(kw)
    return testing.dense_decode_inputs(**args)


def sparse(**kw: Any) -> dict[str, Any]:
    args = dict(b=2, s_q=2, h_q=4, topk=16, page_block_size=16)
    args.update(kw)
    return testing.sparse_decode_inputs(**args)


def decode(inputs: dict[str, Any], md: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    return flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=md))


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# SchedMeta


def test_get_mla_metadata_new_form() -> None:
    md, none = flashmla.get_mla_metadata()
    assert none is None
    assert isinstance(md, flashmla.SchedMeta) and flashmla.FlashMLASchedMeta is SchedMeta
    assert (md.have_initialized, md.config, md.tile_scheduler_metadata, md.num_splits) == (
        False,
        None,
        None,
        None,
    )
    assert flashmla.get_mla_metadata()[0] is not md  # a fresh object per call


def test_schedmeta_first_call_records_config(counting: Counting) -> None:
    inputs = dense()
    md, _ = flashmla.get_mla_metadata()
    out = decode(inputs, md)
    assert md.have_initialized
    assert md.config == DecodeConfig(2, 2, 4, 16, 1, True, False, None, None, None)
    assert len(counting.plans) == 1
    plan = counting.plans[0]
    assert md.plans == {"counting": plan}
    assert isinstance(plan, Schedule)
    assert md.tile_scheduler_metadata is plan.metadata and md.num_splits is plan.num_splits
    assert counting.seen[-1][1] is plan
    assert_same(out, decode(inputs))  # same result as without metadata


def test_schedmeta_same_config_reuses_plan(counting: Counting) -> None:
    md, _ = flashmla.get_mla_metadata()
    first = dense(seed=0)
    decode(first, md)
    plans_with_md = [counting.seen[-1][1]]
    for seed in (1, 2, 3):  # other layers of the same step: same config, other values
        layer = dense(seed=seed)
        got = decode(layer, md)
        plans_with_md.append(counting.seen[-1][1])
        assert_same(got, decode(layer))
    assert all(plan is counting.plans[0] for plan in plans_with_md)
    assert len(counting.plans) == 1 + 3  # the calls without metadata plan every time


MISMATCHES = {
    "b": dict(b=3),
    "s_q": dict(s_q=1),
    "h_q": dict(h_q=8),
    "page_block_size": dict(page_block_size=32),
    "h_k": dict(h_kv=2),
    "causal": dict(causal=False),
    "is_fp8_kvcache": dict(cache_format="fp8_v32", h_q=4),
}


@pytest.mark.parametrize("change", list(MISMATCHES), ids=list(MISMATCHES))
def test_schedmeta_other_config_raises(counting: Counting, change: str) -> None:
    md, _ = flashmla.get_mla_metadata()
    decode(dense(), md)
    config = md.config
    with pytest.raises(AssertionError) as info:
        decode(dense(**MISMATCHES[change]), md)
    err = info.value
    assert isinstance(err, flashmla.SchedMetaMismatchError)
    assert err.argument == "tile_scheduler_metadata"
    assert "use a new get_mla_metadata()" in str(err)
    assert f"first: {config}" in str(err)
    assert getattr(err.got, change) != getattr(config, change)
    assert md.config == config and len(counting.plans) == 1  # nothing changed
    decode(dense(seed=5), md)  # the matching config still works


def test_schedmeta_records_requested_causal(counting: Counting) -> None:
    """Like FlashMLA, the config holds the causal flag as passed, even where s_q = 1 ignores it."""
    md, _ = flashmla.get_mla_metadata()
    decode(dense(s_q=1, causal=True), md)
    assert md.config.causal is True
    with pytest.raises(flashmla.SchedMetaMismatchError):
        decode(dense(s_q=1, causal=False), md)


def test_schedmeta_sparse(counting: Counting) -> None:
    md, _ = flashmla.get_mla_metadata()
    inputs = sparse(
        cache_format="fp8_model1", extra_topk=8, extra_page_block_size=32, topk_length=True
    )
    out = decode(inputs, md)
    assert md.config == DecodeConfig(2, 2, 4, 16, 1, False, True, 16, 32, 8)
    assert len(counting.plans) == 1 and counting.seen[-1][1] is counting.plans[0]
    assert md.tile_scheduler_metadata is None  # this backend's plan is not a Schedule
    assert_same(out, decode(inputs))
    decode(sparse(cache_format="fp8_model1", extra_topk=8, extra_page_block_size=32, seed=3), md)
    assert len(counting.plans) == 2  # one for the call without metadata
    for change in (dict(topk=32), dict(extra_topk=16), dict(extra_page_block_size=16)):
        kw = dict(cache_format="fp8_model1", extra_topk=8, extra_page_block_size=32)
        kw.update(change)
        with pytest.raises(flashmla.SchedMetaMismatchError):
            decode(sparse(**kw), md)


def test_schedmeta_dense_then_sparse(counting: Counting) -> None:
    md, _ = flashmla.get_mla_metadata()
    decode(dense(s_q=2, h_q=4, causal=False), md)
    with pytest.raises(flashmla.SchedMetaMismatchError):
        decode(sparse(cache_format="bf16"), md)


def test_schedmeta_with_backend_without_planner() -> None:
    md, _ = flashmla.get_mla_metadata()
    with flashmla.use_backend("ref"):
        decode(dense(), md)
        assert md.have_initialized and md.plans == {} and md.tile_scheduler_metadata is None
        with pytest.raises(flashmla.SchedMetaMismatchError):
            decode(dense(b=1), md)


def test_schedmeta_plans_per_backend(counting: Counting) -> None:
    md, _ = flashmla.get_mla_metadata()
    inputs = dense()
    with flashmla.use_backend("ref"):
        decode(inputs, md)
    assert md.plans == {}
    decode(inputs, md)
    assert list(md.plans) == ["counting"]


# --------------------------------------------------------------------------------------------
# Old-form metadata


@pytest.mark.parametrize(
    "s_q, h_q, h_kv, parts", [(1, 128, 1, 66), (2, 128, 1, 33), (1, 64, 1, 132), (1, 16, 2, 66)]
)
def test_old_form_dense_metadata_shape(s_q: int, h_q: int, h_kv: int, parts: int) -> None:
    seqlens = torch.tensor([1000, 64, 0], dtype=torch.int32)
    md, ns = flashmla.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
    assert md.dtype == ns.dtype == torch.int32
    assert md.shape == (parts, 8) and ns.shape == (4,)
    assert md.is_contiguous() and ns.is_contiguous()
    assert ns[0] == 0 and bool((ns[1:] >= ns[:-1]).all())


@pytest.mark.parametrize("s_q, h_q, parts", [(1, 128, 66), (1, 64, 132), (2, 128, 33)])
def test_old_form_sparse_metadata_shape(s_q: int, h_q: int, parts: int) -> None:
    seqlens = torch.tensor([5, 7], dtype=torch.int32)
    md, ns = flashmla.get_mla_metadata(seqlens, s_q * h_q, 1, num_heads_q=h_q, topk=2048)
    assert md.shape == (parts, 8) and ns.shape == (3,)


def test_old_form_metadata_is_accepted(counting: Counting) -> None:
    inputs = dense(varlen=True)
    md, ns = flashmla.get_mla_metadata(inputs["cache_seqlens"], 2 * 4, 1)
    out = flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=md, num_splits=ns))
    p = counting.seen[-1][0]
    assert p.schedule.metadata is md and p.schedule.num_splits is ns
    assert_same(out, decode(inputs))
    assert decode(inputs) is not None and counting.seen[-1][0].schedule is None
    with flashmla.use_backend("ref"):
        assert_same(
            out,
            flashmla.flash_mla_with_kvcache(
                **dict(inputs, tile_scheduler_metadata=md, num_splits=ns)
            ),
        )


def test_num_splits_rules() -> None:
    inputs = dense()
    md, ns = flashmla.get_mla_metadata(inputs["cache_seqlens"], 8, 1)
    flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=md, num_splits=ns))
    flashmla.flash_mla_with_kvcache(
        **dict(inputs, tile_scheduler_metadata=SchedMeta(), num_splits=None)
    )
    for bad in (
        dict(tile_scheduler_metadata=SchedMeta(), num_splits=ns),
        dict(num_splits=ns),
        dict(tile_scheduler_metadata=md),
    ):
        with pytest.raises(flashmla.InvalidArgumentError) as info:
            flashmla.flash_mla_with_kvcache(**dict(inputs, **bad))
        assert info.value.argument == "num_splits"


# --------------------------------------------------------------------------------------------
# Output layouts


def test_dense_decode_layout() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        out, lse = decode(dense(b=2, s_q=3, h_q=4, dtype=dtype))
        assert out.shape == (2, 3, 4, 512) and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32 and lse.is_contiguous()


@pytest.mark.parametrize("cache_format", ["fp8_v32", "fp8_model1", "bf16"])
def test_sparse_decode_layout(cache_format: str) -> None:
    out, lse = decode(sparse(b=2, s_q=3, h_q=4, cache_format=cache_format))
    assert out.shape == (2, 3, 4, 512) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    assert lse.stride() == (12, 1, 4)  # a [b, h_q, s_q] view of a contiguous [b, s_q, h_q]
    assert lse.transpose(1, 2).is_contiguous()


def test_sparse_prefill_layout() -> None:
    out, max_logits, lse = flashmla.flash_mla_sparse_fwd(
        **testing.sparse_prefill_inputs(5, 16, 4, 8)
    )
    assert out.shape == (5, 4, 512) and out.dtype == torch.bfloat16 and out.is_contiguous()
    for t in (max_logits, lse):
        assert t.shape == (5, 4) and t.dtype == torch.float32 and t.is_contiguous()


@pytest.mark.parametrize("fn", ["unpacked", "qkvpacked", "kvpacked"])
def test_mha_layout(fn: str) -> None:
    m = testing.mha_inputs(2, 3, 3, 4, d_qk=16, d_v=8)
    out, lse = run_mha(fn, m)
    total_q = m["q"].shape[0]
    assert out.shape == (total_q, 4, 8) and out.dtype == torch.bfloat16
    assert lse.shape == (total_q, 4) and lse.dtype == torch.float32
    assert lse.stride() == (1, total_q)


# --------------------------------------------------------------------------------------------
# Defaults and causal handling


def test_default_softmax_scale_dense() -> None:
    inputs = dense(softmax_scale=None)
    default = decode(inputs)
    assert_same(default, decode(dict(inputs, softmax_scale=576**-0.5)))
    assert not torch.equal(default[1], decode(dict(inputs, softmax_scale=0.05))[1])


def test_default_softmax_scale_sparse_uses_q_head_dim() -> None:
    inputs = dict(sparse(cache_format="fp8_model1"), softmax_scale=None)
    assert_same(decode(inputs), decode(dict(inputs, softmax_scale=512**-0.5)))
    assert not torch.equal(decode(inputs)[1], decode(dict(inputs, softmax_scale=576**-0.5))[1])


def test_default_softmax_scale_mha() -> None:
    m = dict(testing.mha_inputs(2, 3, 4, 2, d_qk=16, d_v=8), softmax_scale=None)
    default = flashmla.flash_attn_varlen_func(**m)
    assert_same(default, flashmla.flash_attn_varlen_func(**dict(m, softmax_scale=0.25)))
    assert not torch.equal(
        default[1], flashmla.flash_attn_varlen_func(**dict(m, softmax_scale=0.3))[1]
    )


def test_sparse_prefill_has_no_default_scale() -> None:
    sig = inspect.signature(flashmla.flash_mla_sparse_fwd)
    assert sig.parameters["sm_scale"].default is inspect.Parameter.empty


def _dense_problem(inputs: dict[str, Any]) -> problems.DenseDecodeProblem:
    bound = inspect.signature(flashmla.flash_mla_with_kvcache).bind(**inputs)
    bound.apply_defaults()
    return ops._decode_problem(*bound.arguments.values())


def test_causal_ignored_when_s_q_is_1() -> None:
    inputs = dense(s_q=1, varlen=True, causal=True)
    assert_same(decode(inputs), decode(dict(inputs, causal=False)))
    p = _dense_problem(inputs)
    assert p.causal is False and "causal" not in p.facts.features
    # with s_q > 1 the flag matters (so the comparison above could fail)
    inputs = dense(s_q=2, varlen=True, causal=True)
    assert not torch.equal(decode(inputs)[1], decode(dict(inputs, causal=False))[1])
    assert "causal" in _dense_problem(inputs).facts.features


def test_causal_s_q_1_runs_on_backend_without_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    import flashmla_ref.ops as ref

    monkeypatch.setitem(sys.modules, "_flashmla_test_nocausal", ref)
    support = OpSupport(devices=frozenset({"cpu"}), features=frozenset({"mtp"}))
    REGISTRY.reload()
    try:
        flashmla.register_backend(
            BackendSpec("nocausal", "0", "_flashmla_test_nocausal", {"dense_decode": support})
        )
        with flashmla.use_backend("nocausal"):
            decode(dense(s_q=1, causal=True))
            with pytest.raises(flashmla.NoBackendError, match="does not support causal"):
                decode(dense(s_q=2, causal=True))
    finally:
        REGISTRY.reload()


# --------------------------------------------------------------------------------------------
# Packed MHA variants


def packed_inputs(m: dict[str, Any], fn: str) -> dict[str, Any]:
    d = m["q"].shape[-1]
    common = dict(softmax_scale=m["softmax_scale"], causal=m["causal"])
    if fn == "qkvpacked":
        return dict(
            qkv=torch.cat([m["q"], m["k"], m["v"]], dim=-1).detach().requires_grad_(m["q"].requires_grad),
            cu_seqlens=m["cu_seqlens_qo"], max_seqlen=m["max_seqlen_qo"], head_dim_qk=d, **common,
        )  # fmt: skip
    return dict(
        q=m["q"].detach().requires_grad_(m["q"].requires_grad),
        kv=torch.cat([m["k"], m["v"]], dim=-1).detach().requires_grad_(m["k"].requires_grad),
        cu_seqlens_qo=m["cu_seqlens_qo"], cu_seqlens_kv=m["cu_seqlens_kv"],
        max_seqlen_qo=m["max_seqlen_qo"], max_seqlen_kv=m["max_seqlen_kv"], head_dim_qk=d, **common,
    )  # fmt: skip


def run_mha(fn: str, m: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if fn == "unpacked":
        return flashmla.flash_attn_varlen_func(**m)
    func = getattr(flashmla, f"flash_attn_varlen_{fn}_func")
    return func(**packed_inputs(m, fn))


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_equals_unpacked(causal: bool) -> None:
    # qkvpacked needs h_q == h_kv and the same lengths for q and kv
    m = testing.mha_inputs(
        3, 4, 4, 2, d_qk=16, d_v=8, varlen=False, causal=causal, requires_grad=True
    )
    p = packed_inputs(m, "qkvpacked")
    got = flashmla.flash_attn_varlen_qkvpacked_func(**p)
    want = flashmla.flash_attn_varlen_func(**m)
    assert_same(got, want)
    g = torch.randn_like(want[0])
    (want[0] * g).sum().backward()
    (got[0] * g).sum().backward()
    assert torch.equal(p["qkv"].grad, torch.cat([m["q"].grad, m["k"].grad, m["v"].grad], dim=-1))


@pytest.mark.parametrize("causal", [False, True])
def test_kvpacked_equals_unpacked(causal: bool) -> None:
    m = testing.mha_inputs(
        3, 3, 5, 4, h_kv=2, d_qk=16, d_v=8, varlen=True, causal=causal, requires_grad=True
    )
    p = packed_inputs(m, "kvpacked")
    got = flashmla.flash_attn_varlen_kvpacked_func(**p)
    want = flashmla.flash_attn_varlen_func(**m)
    assert_same(got, want)
    g = torch.randn_like(want[0])
    (want[0] * g).sum().backward()
    (got[0] * g).sum().backward()
    assert torch.equal(p["q"].grad, m["q"].grad)
    assert torch.equal(p["kv"].grad, torch.cat([m["k"].grad, m["v"].grad], dim=-1))


# --------------------------------------------------------------------------------------------
# MHA autograd against torch autograd through a plain fp32 reference


def attention_fp32(q, k, v, cu_q, cu_k, scale: float, causal: bool):
    """fp32 varlen attention with bottom-right causal masking and GQA; out, lse [total_q, h_q]."""
    h_q, h_kv = q.shape[1], k.shape[1]
    outs, lses = [], []
    for i in range(cu_q.shape[0] - 1):
        qs = q[cu_q[i] : cu_q[i + 1]]
        ks = k[cu_k[i] : cu_k[i + 1]].repeat_interleave(h_q // h_kv, dim=1)
        vs = v[cu_k[i] : cu_k[i + 1]].repeat_interleave(h_q // h_kv, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            lq, lk = qs.shape[0], ks.shape[0]
            keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vs))
        lses.append(lse.t())
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize(
    "dtype, h_kv, causal, loss",
    [
        (torch.bfloat16, 4, False, "out+lse"),
        (torch.bfloat16, 2, True, "out+lse"),
        (torch.float16, 1, True, "out+lse"),
        (torch.bfloat16, 2, True, "out"),
        (torch.bfloat16, 2, True, "lse"),
    ],
    ids=["bf16-mha", "bf16-gqa-causal", "fp16-mqa-causal", "out-only", "lse-only"],
)
def test_mha_gradients_match_torch_autograd(
    dtype: torch.dtype, h_kv: int, causal: bool, loss: str
) -> None:
    m = testing.mha_inputs(
        3,
        5,
        7,
        4,
        h_kv=h_kv,
        d_qk=24,
        d_v=16,
        varlen=True,
        causal=causal,
        dtype=dtype,
        requires_grad=True,
        seed=3,
    )
    out, lse = flashmla.flash_attn_varlen_func(**m)
    leaves = [m[k].detach().float().requires_grad_() for k in ("q", "k", "v")]
    ref_out, ref_lse = attention_fp32(
        *leaves, m["cu_seqlens_qo"], m["cu_seqlens_kv"], m["softmax_scale"], causal
    )
    testing.assert_close("out", out, ref_out, testing.TOLERANCES["mha"]["out"])
    testing.assert_close("lse", lse, ref_lse, (1e-5, 1e-5, 1e-7))

    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g).to(dtype).float()  # exactly representable
    w_lse = torch.randn(lse.shape, generator=g)

    def total(o, l):
        terms = []
        if "out" in loss:
            terms.append((o.float() * w_out).sum())
        if "lse" in loss:
            terms.append((l * w_lse).sum())
        return sum(terms)

    total(out, lse).backward()
    total(ref_out, ref_lse).backward()
    for name, leaf in zip(("q", "k", "v"), leaves):
        grad = m[name].grad
        assert grad is not None and grad.dtype == dtype and grad.shape == m[name].shape
        if name == "v" and loss == "lse":  # lse does not depend on v
            assert leaf.grad is None and not grad.any()
            continue
        scale = leaf.grad.abs().max().item()
        assert scale > 0
        # two units of rounding of the largest gradient, FlashMLA's relative bound
        abs_tol = 2 * torch.finfo(dtype).eps * scale
        testing.assert_close(f"d{name}", grad, leaf.grad, (abs_tol, 8.01 / 128, 1e-5))


def test_mha_lse_gradient_is_honoured() -> None:
    """Adding an lse term changes dq and dk (and not dv, which lse does not depend on)."""
    m = testing.mha_inputs(2, 4, 6, 2, d_qk=16, d_v=8, varlen=True, requires_grad=True)
    grads = []
    for with_lse in (False, True):
        for name in ("q", "k", "v"):
            m[name].grad = None
        out, lse = flashmla.flash_attn_varlen_func(**m)
        loss = (
            out.float().sum()
            + (lse * torch.linspace(-1, 1, lse.numel()).view(lse.shape)).sum() * with_lse
        )
        loss.backward()
        grads.append([m[name].grad.clone() for name in ("q", "k", "v")])
    assert not torch.equal(grads[0][0], grads[1][0])
    assert not torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][2], grads[1][2])


def test_mha_no_grad_without_requires_grad() -> None:
    m = testing.mha_inputs(2, 3, 3, 2, d_qk=16, d_v=8)
    out, lse = flashmla.flash_attn_varlen_func(**m)
    assert not out.requires_grad and not lse.requires_grad


def test_cache_format_enum_is_a_string() -> None:
    assert CacheFormat("fp8_v32") is CacheFormat.FP8_V32 and str(CacheFormat.BF16) == "bf16"
