"""The one piece of math every reference op shares: masked softmax attention in fp32."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

# Elements of fp32 scratch one chunk may create (~1 GiB): bounds memory on the largest shapes.
CHUNK_ELEMENTS = 1 << 28


def chunks(total: int, per_item: int) -> Iterator[slice]:
    """Slices of ``range(total)`` whose items cost ``per_item`` elements each, within budget."""
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of ``q [R, H, d]`` over keys ``k [R, N, d]`` and values ``v [R, N, d_v]``.

    ``mask [R, H or 1, N]`` says which keys each query sees. Key/value rows that no query may
    see must already be zero (so that NaN padding cannot leak through ``0 * NaN``). Returns fp32
    ``out [R, H, d_v]``, natural ``lse [R, H]`` and ``max_logit [R, H]``; a query that sees no
    key gets ``out = 0``, ``lse = +inf``, ``max_logit = -inf``.
    """
    scores = torch.einsum("rhd,rnd->rhn", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    m = scores.amax(dim=-1)
    empty = m == -math.inf
    p = torch.exp(scores - torch.where(empty, 0.0, m).unsqueeze(-1))
    denom = p.sum(dim=-1)
    out = torch.einsum("rhn,rnd->rhd", p, v.float())
    out = out / torch.where(empty, 1.0, denom).unsqueeze(-1)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    lse = torch.where(empty, math.inf, torch.log(denom) + m)
    return out, lse, m


def apply_sink(out: Tensor, lse: Tensor, sink: Tensor | None) -> Tensor:
    """Scale ``out [..., H, dv]`` by ``1 / (1 + exp(sink_h - lse))``; rows with ``lse = +inf``
    (no key) stay 0 whatever the sink."""
    if sink is None:
        return out
    factor = torch.sigmoid(lse - sink.float())
    factor = torch.where(torch.isinf(lse) & (lse > 0), 0.0, factor)
    return out * factor.unsqueeze(-1)
