"""torch.compile(fullgraph=True) over every public function gives eager's results, the ops stay
opaque custom ops in the graph, and ``torch.library.opcheck`` accepts them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch.library import opcheck

import flashmla
from flashmla import ops, testing

BACKENDS = ["eager", "inductor"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, fullgraph=True, backend=backend)


def assert_same(got: Any, want: Any) -> None:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert g.stride() == w.stride(), (g.stride(), w.stride())
        assert torch.equal(g, w)


class GraphCapture:
    """A compile backend that records the FX graphs it receives and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        return {
            str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"
        }


# --------------------------------------------------------------------------------------------
# Inputs: two shapes per case, so that the second call recompiles with dynamic sizes


def dense_cases() -> list[dict[str, Any]]:
    return [
        testing.dense_decode_inputs(2, 2, 4, 40, page_block_size=16, causal=True, varlen=True, softmax_scale=0.1),
        testing.dense_decode_inputs(3, 2, 4, 70, page_block_size=16, causal=True, varlen=True, seed=1, softmax_scale=0.2),
    ]  # fmt: skip


def sparse_cases() -> list[dict[str, Any]]:
    kw = dict(
        cache_format="fp8_model1", page_block_size=16, topk_length=True, attn_sink=True,
        extra_topk=8, extra_page_block_size=16, extra_topk_length=True,
    )  # fmt: skip
    return [
        testing.sparse_decode_inputs(2, 1, 4, 16, **kw),
        testing.sparse_decode_inputs(3, 1, 4, 16, seed=1, **kw),
    ]


def prefill_cases() -> list[dict[str, Any]]:
    return [
        testing.sparse_prefill_inputs(4, 32, 4, 16, attn_sink=True, topk_length=True),
        dict(testing.sparse_prefill_inputs(6, 40, 4, 16, attn_sink=True, topk_length=True, seed=1), sm_scale=0.3),
    ]  # fmt: skip


def mha_cases(requires_grad: bool = False) -> list[dict[str, Any]]:
    return [
        testing.mha_inputs(2, 3, 5, 4, h_kv=2, d_qk=16, d_v=8, varlen=True, causal=True, requires_grad=requires_grad),
        dict(
            testing.mha_inputs(3, 4, 6, 4, h_kv=2, d_qk=16, d_v=8, varlen=True, causal=True, requires_grad=requires_grad, seed=1),
            softmax_scale=0.3,
        ),
    ]  # fmt: skip


def decode(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return flashmla.flash_mla_with_kvcache(**inputs)


def decode_fresh_schedmeta(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    md, _ = flashmla.get_mla_metadata()
    return flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=md))


def decode_with(md: Any, ns: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return flashmla.flash_mla_with_kvcache(
        **dict(inputs, tile_scheduler_metadata=md, num_splits=ns)
    )


def prefill(inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    return flashmla.flash_mla_sparse_fwd(**inputs)


def mha(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return flashmla.flash_attn_varlen_func(**inputs)


# --------------------------------------------------------------------------------------------
# Forward results equal eager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fn, cases",
    [
        (decode, dense_cases),
        (decode_fresh_schedmeta, dense_cases),
        (decode, sparse_cases),
        (prefill, prefill_cases),
        (mha, mha_cases),
    ],
    ids=["dense", "dense-schedmeta", "sparse", "sparse-prefill", "mha"],
)
def test_compiled_forward_equals_eager(backend: str, fn: Callable, cases: Callable) -> None:
    cfn = compiled(fn, backend)
    for inputs in cases():
        assert_same(cfn(inputs), fn(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_dense_with_external_schedmeta(backend: str) -> None:
    inputs = dense_cases()[0]
    md, _ = flashmla.get_mla_metadata()
    want = decode_with(md, None, inputs)
    cfn = compiled(decode_with, backend)
    assert_same(cfn(flashmla.get_mla_metadata()[0], None, inputs), want)
    # also with one that eager calls have already initialised
    assert_same(cfn(md, None, inputs), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_dense_with_old_form_metadata(backend: str) -> None:
    cfn = compiled(decode_with, backend)
    for inputs in dense_cases():
        _, s_q, h_q, _ = inputs["q"].shape
        md, ns = flashmla.get_mla_metadata(inputs["cache_seqlens"], s_q * h_q, 1)
        assert_same(cfn(md, ns, inputs), decode_with(md, ns, inputs))


def test_graph_holds_opaque_custom_ops() -> None:
    capture = GraphCapture()
    compiled(decode, capture)(dense_cases()[0])
    compiled(lambda inputs: decode(inputs), capture)(sparse_cases()[0])  # another cache width
    compiled(prefill, capture)(prefill_cases()[0])
    compiled(mha, capture)(mha_cases()[0])
    targets = capture.targets()
    for op in (
        "flashmla.with_kvcache.default",
        "flashmla.sparse_prefill.default",
        "flashmla.mha_forward.default",
    ):
        assert op in targets, targets
    assert not any("einsum" in t or "softmax" in t for t in targets), targets


@pytest.mark.parametrize(
    "fn, inputs, argument",
    [
        (prefill, lambda: dict(prefill_cases()[0], d_v=256), "d_v"),
        (decode, lambda: dict(dense_cases()[0], head_dim_v=576), "head_dim_v"),
        (decode, lambda: dict(sparse_cases()[0], causal=True), "causal"),
        (mha, lambda: dict(mha_cases()[0], max_seqlen_kv=-1), "max_seqlen_kv"),
    ],
    ids=["prefill", "dense", "sparse", "mha"],
)
def test_compiled_validation_errors(fn: Callable, inputs: Callable, argument: str) -> None:
    """Bad arguments fail while tracing (in the ops' fake implementations); dynamo wraps the
    typed error in a RuntimeError whose cause chain holds it."""
    with pytest.raises(RuntimeError) as info:
        compiled(fn, "eager")(inputs())
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, flashmla.InvalidArgumentError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, flashmla.InvalidArgumentError), info.value
    assert err.argument == argument


def test_compiled_python_level_errors_without_fullgraph() -> None:
    """Checks made in Python before the op (dropout_p, deterministic) graph-break and raise
    the typed error itself; with fullgraph=True dynamo reports them as unsupported."""
    cfn = torch.compile(mha, backend="eager")
    for change, argument in (
        (dict(dropout_p=0.5), "dropout_p"),
        (dict(deterministic=1), "deterministic"),
    ):
        with pytest.raises(flashmla.InvalidArgumentError) as info:
            cfn(dict(mha_cases()[0], **change))
        assert info.value.argument == argument
    torch._dynamo.reset()  # dynamo caches per code object, whatever the compile options
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(mha, "eager")(dict(mha_cases()[0], dropout_p=0.5))


# --------------------------------------------------------------------------------------------
# Backward


def _mha_grads(fn: Callable, inputs: dict[str, Any]) -> list[torch.Tensor]:
    for k in ("q", "k", "v"):
        inputs[k].grad = None
    out, lse = fn(inputs)
    g = torch.Generator().manual_seed(0)
    (out.float() * torch.randn(out.shape, generator=g)).sum().add(lse.sum()).backward()
    return [out, lse, *(inputs[k].grad for k in ("q", "k", "v"))]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_mha_backward_equals_eager(backend: str) -> None:
    cases = mha_cases(requires_grad=True)
    if backend == "inductor":
        cases = cases[:1]  # a dynamic-shape recompile of forward + backward costs ~30 s on CPU
    cfn = compiled(mha, backend)
    for inputs in cases:
        want = _mha_grads(mha, inputs)
        got = _mha_grads(cfn, inputs)
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert torch.equal(g, w), name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_packed_mha_backward(backend: str) -> None:
    m = testing.mha_inputs(2, 4, 4, 2, d_qk=16, d_v=8, causal=True)
    qkv = torch.cat([m["q"], m["k"], m["v"]], dim=-1)

    def loss(qkv: torch.Tensor) -> torch.Tensor:
        out, lse = flashmla.flash_attn_varlen_qkvpacked_func(
            qkv, m["cu_seqlens_qo"], m["max_seqlen_qo"], 16, causal=True
        )
        return out.float().pow(2).sum() + lse.sum()

    a, b = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    loss(a).backward()
    compiled(loss, backend)(b).backward()
    assert torch.equal(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Cache writes (a mutating op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_format", ["bf16", "fp8_v32", "fp8_model1"])
def test_compiled_write_kv_cache(backend: str, cache_format: str) -> None:
    d = {"bf16": 576, "fp8_v32": 576, "fp8_model1": 512}[cache_format]

    def write(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        flashmla.write_kv_cache(cache, new, slots)
        return cache

    cfn = compiled(write, backend)
    for n, slots in ((3, [0, 9, -1]), (5, [1, 2, 40, 15, 6])):
        new = (torch.randn(n, 1, d) / 4).bfloat16()
        slots = torch.tensor(slots, dtype=torch.int32)
        eager_cache = flashmla.allocate_paged_cache(3, 8, cache_format=cache_format)
        compiled_cache = flashmla.allocate_paged_cache(3, 8, cache_format=cache_format)
        write(eager_cache, new, slots)
        out = cfn(compiled_cache, new, slots)
        assert out.data_ptr() == compiled_cache.data_ptr()
        assert torch.equal(compiled_cache.view(torch.uint8), eager_cache.view(torch.uint8))
        assert compiled_cache.view(torch.uint8).any()


# --------------------------------------------------------------------------------------------
# opcheck


def _args(fn: Callable, inputs: dict[str, Any]) -> tuple:
    bound = inspect.signature(fn).bind(**inputs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _dense_md_args() -> tuple:
    inputs = dense_cases()[0]
    md, ns = flashmla.get_mla_metadata(inputs["cache_seqlens"], 8, 1)
    return _args(
        flashmla.flash_mla_with_kvcache, dict(inputs, tile_scheduler_metadata=md, num_splits=ns)
    )


def _mha_args(requires_grad: bool = False) -> tuple:
    m = mha_cases(requires_grad)[0]
    keys = (
        "q",
        "k",
        "v",
        "cu_seqlens_qo",
        "cu_seqlens_kv",
        "max_seqlen_qo",
        "max_seqlen_kv",
        "softmax_scale",
        "causal",
    )
    return tuple(m[k] for k in keys)


def _mha_backward_args(with_dlse: bool) -> tuple:
    q, k, v, *rest = _mha_args()
    out, lse = ops.mha_forward(q, k, v, *rest)
    dlse = torch.randn_like(lse) if with_dlse else None
    return (torch.randn_like(out), dlse, q, k, v, out, lse, *rest)


def _write_args(cache_format: str) -> tuple:
    d = 512 if cache_format == "fp8_model1" else 576
    cache = flashmla.allocate_paged_cache(3, 4, cache_format=cache_format)
    slots = torch.tensor([0, 3, -1, 11, 100], dtype=torch.int32)
    return cache, (torch.randn(5, 1, d) / 4).bfloat16(), slots, cache_format != "bf16"


OPCHECK = {
    "dense": lambda: (ops.with_kvcache, _args(flashmla.flash_mla_with_kvcache, dense_cases()[0])),
    "dense-old-metadata": lambda: (ops.with_kvcache, _dense_md_args()),
    "sparse-bf16": lambda: (
        ops.with_kvcache,
        _args(flashmla.flash_mla_with_kvcache, testing.sparse_decode_inputs(2, 2, 4, 8, cache_format="bf16", page_block_size=16, attn_sink=True)),
    ),
    "sparse-prefill": lambda: (ops.sparse_prefill, _args(flashmla.flash_mla_sparse_fwd, prefill_cases()[0])),
    "mha-forward": lambda: (ops.mha_forward, _mha_args()),
    "mha-forward-grad": lambda: (ops.mha_forward, _mha_args(requires_grad=True)),
    "mha-backward": lambda: (ops.mha_backward, _mha_backward_args(False)),
    "mha-backward-dlse": lambda: (ops.mha_backward, _mha_backward_args(True)),
    "cache-write-bf16": lambda: (ops.cache_write, _write_args("bf16")),
    # FP8 caches: see test_opcheck_fp8_dynamic_shapes
    "sparse-fp8": lambda: (ops.with_kvcache, _args(flashmla.flash_mla_with_kvcache, sparse_cases()[0])),
    "dense-fp8": lambda: (
        ops.with_kvcache,
        _args(flashmla.flash_mla_with_kvcache, testing.dense_decode_inputs(2, 1, 4, 20, page_block_size=16, cache_format="fp8_v32")),
    ),
    "cache-write-fp8": lambda: (ops.cache_write, _write_args("fp8_v32")),
}  # fmt: skip
FP8 = {"sparse-fp8", "dense-fp8", "cache-write-fp8"}
ALL_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name: str) -> None:
    op, args = OPCHECK[name]()
    utils = tuple(u for u in ALL_UTILS if not (name in FP8 and u == "test_aot_dispatch_dynamic"))
    result = opcheck(op, args, test_utils=utils)
    assert set(result) == set(utils) and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("name", sorted(FP8))
def test_opcheck_fp8_dynamic_shapes(name: str) -> None:
    op, args = OPCHECK[name]()
    opcheck(op, args, test_utils="test_aot_dispatch_dynamic")


def test_opcheck_covers_every_custom_op() -> None:
    checked = {OPCHECK[name]()[0] for name in OPCHECK}
    assert checked == {
        ops.with_kvcache,
        ops.sparse_prefill,
        ops.mha_forward,
        ops.mha_backward,
        ops.cache_write,
    }
