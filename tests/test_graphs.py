"""CUDA-graph capture of decode: metadata created inside the capture, replays with changed
``cache_seqlens`` / ``topk_length`` must match eager results and actually change the output."""

from __future__ import annotations

import pytest
import torch

import flashmla
from flashmla import testing
from flashmla.registry import REGISTRY

from .conftest import ON_GPU

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")]


def _capturable(backend: str, inputs: dict) -> None:
    facts = testing.problem_for("decode", inputs).facts
    b = REGISTRY.get(backend)
    reasons = b.reasons(facts)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    if not b.spec.ops[facts.op].capturable:
        pytest.skip(f"{backend}: declares {facts.op} not capturable")


def _capture(backend: str, inputs: dict):
    def step():
        meta, _ = flashmla.get_mla_metadata()  # created inside the capture: replays reschedule
        return flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=meta))

    with flashmla.use_backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm up: compile kernels before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = step()
    return graph, out, lse


def _eager(backend: str, inputs: dict):
    with flashmla.use_backend(backend):
        return flashmla.flash_mla_with_kvcache(
            **dict(inputs, tile_scheduler_metadata=flashmla.get_mla_metadata()[0])
        )


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_decode_graph_replay(backend, kind):
    if kind == "dense":
        inputs = testing.dense_decode_inputs(
            8, 2, 128, 2048, varlen=True, causal=True, device="cuda", seed=11
        )
        lengths = inputs["cache_seqlens"]
    else:
        inputs = testing.sparse_decode_inputs(
            8, 2, 64, 512, s_k=1024, topk_length=True, attn_sink=True, device="cuda", seed=12
        )
        lengths = inputs["topk_length"]
    _capturable(backend, inputs)
    graph, out, lse = _capture(backend, inputs)
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = _eager(backend, inputs)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    before = out.clone()
    lengths.copy_(
        torch.maximum(lengths // 3, torch.ones_like(lengths))
    )  # new lengths, same buffers
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_lse = _eager(backend, inputs)
    assert not torch.equal(out, before), "replay did not recompute (was the work captured?)"
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
