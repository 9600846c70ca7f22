"""Check the SM90 kernels that are not registered yet against the reference, calling their
launchers directly (GPU): bf16-row sparse decode and sparse prefill.

    python benchmarks/sm90_wip_check.py"""

from __future__ import annotations

import torch
from flashmla_cuda import decode_sm90

from flashmla import testing


def main() -> None:
    dev = torch.device("cuda")
    cases = [
        ("sparse bf16", dict(b=16, s_q=2, h_q=128, topk=1024, s_k=4096, cache_format="bf16")),
        ("sparse bf16 sink", dict(b=8, s_q=1, h_q=64, topk=512, s_k=650, page_block_size=53,
                                  cache_format="bf16", attn_sink=True, topk_length=True)),
    ]  # fmt: skip
    for name, case in cases:
        inputs = testing.sparse_decode_inputs(device=dev, seed=4, **case)
        p = testing.problem_for("decode", inputs)
        want = testing.reference("decode", inputs)
        got = decode_sm90.sparse_decode(p, None)
        report(name, got, want, "sparse_decode")
    for h_q, topk_length in ((128, False), (64, True)):
        inputs = testing.sparse_prefill_inputs(
            512,
            2048,
            h_q,
            1024,
            topk_length=topk_length,
            attn_sink=True,
            invalid_rows=True,
            device=dev,
            seed=5,
        )
        p = testing.problem_for("sparse_prefill", inputs)
        want = testing.reference("sparse_prefill", inputs)
        got = decode_sm90.sparse_prefill(p)
        report(f"prefill h_q={h_q}", got, want, "sparse_prefill")


def report(name, got, want, key) -> None:
    tol = testing.TOLERANCES[key]
    names = ("out", "max_logits", "lse") if len(got) == 3 else ("out", "lse")
    problems = []
    for field, g, w in zip(names, got, want, strict=True):
        problems += testing.compare(g, w, *tol.get(field, tol["lse"]))
    worst = max((g.float() - w.float()).abs().nan_to_num(0, 1e9, 1e9).max().item()
                for g, w in zip(got, want, strict=True))  # fmt: skip
    print(f"{name}: {'ok' if not problems else 'FAIL ' + '; '.join(map(str, problems))[:300]}"
          f" (max abs diff {worst:.3g})")  # fmt: skip


if __name__ == "__main__":
    main()
