"""A decoding step as engines run it: one SchedMeta shared by every layer, each layer with its
own cache and queries. Backends may build their launches once per step and reuse them; every
layer's result must still be its own (against the reference)."""

from __future__ import annotations

import pytest

import flashmla
from flashmla import testing

from .conftest import DEVICE, skip_unless_supported

STEPS = {
    "dense-mtp": dict(b=3, s_q=2, h_q=16, s_k=0, causal=True, seqlens=[100, 140, 1]),
    "dense-128-heads": dict(b=2, s_q=1, h_q=128, s_k=0, seqlens=[300, 64]),
    "dense-fp8": dict(b=2, s_q=1, h_q=16, s_k=0, cache_format="fp8_v32", page_block_size=32, seqlens=[90, 60]),
    "sparse-extra": dict(
        b=2, s_q=1, h_q=16, topk=32, s_k=100, cache_format="fp8_model1", page_block_size=61,
        varlen=False, topk_length=True, attn_sink=True, extra_topk=32, extra_page_block_size=8,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STEPS))
def test_layers_share_a_schedmeta(backend, name):
    case = STEPS[name]
    make = testing.sparse_decode_inputs if "topk" in case else testing.dense_decode_inputs
    meta, _ = flashmla.get_mla_metadata()
    for layer in range(3):
        inputs = make(device=DEVICE, seed=layer, **case)
        skip_unless_supported(backend, testing.problem_for("decode", inputs))
        want = testing.reference("decode", inputs)
        with flashmla.use_backend(backend):
            out, lse = flashmla.flash_mla_with_kvcache(**dict(inputs, tile_scheduler_metadata=meta))
        tol = testing.TOLERANCES["sparse_decode" if "topk" in case else "dense_decode"]
        testing.assert_close(f"layer {layer} out", out, want[0], tol["out"])
        testing.assert_close(f"layer {layer} lse", lse, want[1], tol["lse"])
