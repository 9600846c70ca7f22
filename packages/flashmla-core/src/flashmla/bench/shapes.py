"""The benchmark shapes of ``spec/performance.md`` and FlashMLA's own times on them (H200).

Every shape builds its inputs with :mod:`flashmla.testing` on the target device and knows its
FLOP and byte counts by the formulas the reference library uses, so numbers compare."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import testing

D, DV = 576, 512


@dataclass(frozen=True)
class Shape:
    id: str
    op: str  # "decode" (dense or sparse), "sparse_prefill", "mha_forward", "mha_train"
    title: str
    params: dict[str, Any]
    flashmla_us: float | None = None  # the reference library's time on an H200
    kind: str = "compute"  # "compute", "memory" or "latency": which target applies
    extra: dict[str, Any] = field(default_factory=dict)

    def inputs(self, device: torch.device, seed: int = 0) -> dict[str, Any]:
        p = dict(self.params)
        if self.op == "decode" and "topk" in p:
            return testing.sparse_decode_inputs(
                device=device, seed=seed, poison=False, out_of_range=False, **p
            )
        if self.op == "decode":
            return testing.dense_decode_inputs(device=device, seed=seed, poison=False, **p)
        if self.op == "sparse_prefill":
            return testing.sparse_prefill_inputs(device=device, seed=seed, **p)
        return testing.mha_inputs(
            device=device, seed=seed, requires_grad=self.op == "mha_train", **p
        )

    def work(self, inputs: dict[str, Any]) -> tuple[float, float]:
        """(FLOP, bytes) of one call, by ``spec/performance.md``'s formulas."""
        if self.op == "decode" and "indices" in inputs and inputs["indices"] is not None:
            return _sparse_decode_work(inputs)
        if self.op == "decode":
            return _dense_decode_work(inputs)
        if self.op == "sparse_prefill":
            return _sparse_prefill_work(inputs)
        return _mha_work(inputs, backward=self.op == "mha_train")


def _dense_decode_work(x: dict[str, Any]) -> tuple[float, float]:
    b, s_q, h_q, d = x["q"].shape
    h_kv = x["k_cache"].shape[2]
    total = float(x["cache_seqlens"].sum())
    token_bytes = x["k_cache"].shape[-1] if x["is_fp8_kvcache"] else 2 * d
    flop = 2 * s_q * total * h_q * (d + DV)
    return flop, total * h_kv * token_bytes + 2 * b * s_q * h_q * (d + DV)


def _sparse_decode_work(x: dict[str, Any]) -> tuple[float, float]:
    b, s_q, h_q, d = x["q"].shape
    attended = float(
        x["indices"].numel() if x.get("topk_length") is None else x["topk_length"].sum() * s_q
    )
    distinct = x["indices"].unique().numel()
    token_bytes = {656: 656, 584: 576}.get(x["k_cache"].shape[-1], 2 * d)
    flop = 2 * h_q * attended * (d + DV)
    return flop, 2 * b * s_q * h_q * (d + DV) + distinct * token_bytes


def _sparse_prefill_work(x: dict[str, Any]) -> tuple[float, float]:
    s_q, h_q, d = x["q"].shape
    topk = x["indices"].shape[-1]
    valid = float(((x["indices"] >= 0) & (x["indices"] < x["kv"].shape[0])).sum())
    return 2 * s_q * topk * h_q * (d + DV), 2 * d * valid + 2 * s_q * h_q * (d + DV)


def _mha_work(x: dict[str, Any], backward: bool) -> tuple[float, float]:
    h, d = x["q"].shape[1], x["q"].shape[2]
    dv = x["v"].shape[2]
    lq = (x["cu_seqlens_qo"][1:] - x["cu_seqlens_qo"][:-1]).double()
    lk = (x["cu_seqlens_kv"][1:] - x["cu_seqlens_kv"][:-1]).double()
    if x["causal"]:  # query i sees keys j <= i + (lk - lq)
        pairs = float((lq * (lk - lq) + lq * (lq + 1) / 2).sum())
    else:
        pairs = float((lq * lk).sum())
    flop = 2 * h * pairs * (d + dv)
    if backward:
        flop += 2 * h * pairs * (3 * d + 2 * dv)
    nbytes = sum(t.numel() * t.element_size() for t in (x["q"], x["k"], x["v"]))
    return flop, float(nbytes)


def _dense(b, h_q, s_k, s_q=1, varlen=False, **kw) -> dict[str, Any]:
    return dict(
        b=b, s_q=s_q, h_q=h_q, s_k=s_k, varlen=varlen, causal=True, page_block_size=64, **kw
    )


def _sparse(b, s_q, h_q, topk, s_k, **kw) -> dict[str, Any]:
    return dict(
        b=b, s_q=s_q, h_q=h_q, topk=topk, s_k=s_k, cache_format="fp8_v32", varlen=False, **kw
    )


SHAPES: tuple[Shape, ...] = (
    Shape("D1", "decode", "dense decode, compute-bound", _dense(128, 128, 4096), 247.7),
    Shape("D2", "decode", "dense decode, MTP", _dense(64, 128, 8192, s_q=2), 466.1),
    Shape("D3", "decode", "dense decode, varlen", _dense(132, 128, 8192, varlen=True), 532.7),
    Shape("D4", "decode", "dense decode, memory-bound", _dense(64, 16, 4096), 95.4, "memory"),
    Shape("D5", "decode", "dense decode, memory-bound", _dense(128, 16, 8192), 310.8, "memory"),
    Shape("D6", "decode", "dense decode, mid", _dense(32, 64, 16384), 172.3, "memory"),
    Shape("D7", "decode", "dense decode, one long request", _dense(1, 128, 65536), 62.7, "latency"),
    Shape("D8", "decode", "dense decode, short contexts", _dense(128, 128, 1024), 74.9),
    Shape("D9", "decode", "dense decode, small batch", _dense(8, 128, 4096), 37.8, "latency"),
    Shape("D10", "decode", "dense decode, memory-bound, short", _dense(128, 16, 1024), 52.9, "memory"),
    Shape("D11", "decode", "dense decode, long varlen", _dense(128, 128, 32768, varlen=True), 2058.0),
    Shape("S1", "decode", "sparse decode, FP8 V3.2", _sparse(128, 2, 128, 2048, 32768), 349.8),
    Shape("S2", "decode", "sparse decode, FP8", _sparse(64, 1, 128, 2048, 32768), 95.1),
    Shape("S3", "decode", "sparse decode, FP8, 64 heads", _sparse(128, 2, 64, 2048, 32768), 196.9),
    Shape("S4", "decode", "sparse decode, FP8, long topk", _sparse(148, 2, 128, 16384, 32768), 2937.0),
    Shape("P1", "sparse_prefill", "sparse prefill", dict(s_q=4096, s_kv=8192, h_q=128, topk=2048, d_qk=576, attn_sink=True), 3973.0),
    Shape("P2", "sparse_prefill", "sparse prefill, 64 heads", dict(s_q=4096, s_kv=32768, h_q=64, topk=2048, d_qk=576, attn_sink=True), 2299.0),
    Shape("P3", "sparse_prefill", "sparse prefill, d=512", dict(s_q=4096, s_kv=32768, h_q=128, topk=2048, d_qk=512, attn_sink=True), 4081.0),
    Shape("M1", "mha_forward", "dense MHA prefill fwd", dict(b=2, mean_s_q=4096, mean_s_k=4096, h_q=128, d_qk=192, d_v=128, causal=True), None),
    Shape("M2", "mha_train", "dense MHA prefill fwd+bwd", dict(b=2, mean_s_q=4096, mean_s_k=4096, h_q=128, d_qk=192, d_v=128, causal=True), None),
)  # fmt: skip

_CPU_SIZES = {
    "b": lambda n: min(n, 2),
    "h_q": lambda n: min(n, 16),
    "s_k": lambda n: min(n, 256),
    "topk": lambda n: min(n, 64),
    "s_q": lambda n: n if n <= 4 else 32,
    "s_kv": lambda n: min(n, 256),
    "mean_s_q": lambda n: min(n, 64),
    "mean_s_k": lambda n: min(n, 64),
}


def cpu_shapes() -> tuple[Shape, ...]:
    """The same shapes shrunk to what the reference runs in seconds on a CPU."""
    out = []
    for s in SHAPES:
        params = {k: _CPU_SIZES[k](v) if k in _CPU_SIZES else v for k, v in s.params.items()}
        out.append(replace(s, params=params, flashmla_us=None))
    return tuple(out)
