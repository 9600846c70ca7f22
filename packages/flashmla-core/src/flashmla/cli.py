"""The ``flashmla`` command: ``flashmla info`` and ``flashmla bench`` (also ``python -m flashmla``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .registry import OPS, REGISTRY, OpSupport, describe_device


def _summary(op: str, support: OpSupport) -> str:
    parts = ["/".join(sorted(support.devices))]
    if support.arch:
        parts.append(support.arch)
    elif support.min_cc:
        parts.append(f"sm_{support.min_cc[0]}{support.min_cc[1]}+")
    parts.append("/".join(sorted(str(d).removeprefix("torch.") for d in support.dtypes)))
    if support.cache_formats is not None:
        parts.append("/".join(sorted(str(f) for f in support.cache_formats)))
    if support.head_dims is not None:
        parts.append("dims " + ",".join(f"{a}/{b}" for a, b in sorted(support.head_dims)))
    if support.h_q is not None:
        parts.append(f"h_q {sorted(support.h_q)}")
    if op in ("dense_decode", "sparse_decode", "cache_write"):
        parts.append(f"page {support.page_sizes}")
    if support.features:
        parts.append("+" + ",".join(sorted(support.features)))
    return "; ".join(parts)


def info(out=sys.stdout) -> None:
    """Print installed backends and, per op, who can run it on this machine's device and why not."""
    import flashmla

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"flashmla {flashmla.__version__}, torch {torch.__version__}, device {describe_device(device)}",
        file=out,
    )
    backends = sorted(REGISTRY.backends().values(), key=lambda b: -b.spec.priority)
    print("\nbackend     version  priority  status", file=out)
    for b in backends:
        reason = b.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        print(f"{b.name:11} {b.spec.version:8} {b.spec.priority:8}  {status}", file=out)
    for err in REGISTRY.load_errors:
        print(f"  (failed to load {err})", file=out)
    print(f"\nop x backend on {device.type}:", file=out)
    for op in OPS:
        print(f"{op}", file=out)
        for b in backends:
            support = b.spec.ops.get(op)
            if support is None:
                print(f"  {b.name:9} -", file=out)
                continue
            reasons = (
                [b.unavailable_reason()] if b.unavailable_reason() else []
            ) + support.device_reasons(device)
            verdict = "yes" if not reasons else "no: " + "; ".join(reasons)
            print(f"  {b.name:9} {verdict}  [{_summary(op, support)}]", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmla", description="MLA attention kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="installed backends and what each supports on this device")
    bench = sub.add_parser("bench", help="benchmark every available backend against the reference")
    bench.add_argument(
        "--shapes", help="comma-separated shape ids (D1..D11, S1..S4, P1..P3, M1, M2)"
    )
    bench.add_argument("--backends", help="comma-separated backend names (default: all that apply)")
    bench.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    bench.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the reference"
    )
    bench.add_argument("--json", metavar="PATH", help="write full results with device and versions")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    from .bench import run

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    run(
        shape_ids=split(args.shapes) if args.shapes else None,
        backends=split(args.backends) if args.backends else None,
        device=args.device,
        check=not args.no_check,
        json_path=args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
