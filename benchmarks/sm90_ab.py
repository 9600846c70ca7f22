"""A/B two or more sources of the SM90 decode kernel in one process (same GPU, same clocks: the
only fair way to compare variants a few percent apart). Copy a variant next to the kernel under
``kernels/`` first, or give defines after a colon:

    python benchmarks/sm90_ab.py mla_decode_sm90.cu,variant.cu D1,D2,D5
    python benchmarks/sm90_ab.py mla_decode_sm90.cu,mla_decode_sm90.cu:PREFETCH_Q=1 D8,D9
    python benchmarks/sm90_ab.py mla_decode_sm90.cu,mla_decode_sm90.cu:CLUSTER=1 D1,D2,D8
    python benchmarks/sm90_ab.py mla_decode_sm90.cu,variant.cu S1,P1   (sparse builds too)

Times are eager ``do_bench`` medians of the API call, metadata included, so short shapes read
higher than in ``flashmla bench``; compare rows with each other, not with that table."""

from __future__ import annotations

import sys

import torch
import triton.testing
from flashmla_cuda import compiler, decode_sm90

import flashmla
from flashmla.bench import runner
from flashmla.bench.shapes import SHAPES


def _specs(sources: list[str]) -> list[tuple[str, dict[str, int]]]:
    out = []
    for source in sources:
        name, _, spec = source.partition(":")
        out.append((name, {k: int(v) for k, v in (d.split("=") for d in spec.split("+") if d)}))
    return out


def precompile(sources: list[str], shape_ids: list[str]) -> None:
    """Compile every build the runs may ask for up front, in parallel processes (one NVRTC
    compile of this kernel takes tens of seconds): per shape family, the launcher's builds
    with each source's defines on top."""
    d = decode_sm90

    def launched(shape_id: str) -> list[compiler.Build]:
        if shape_id.startswith("D"):
            return [d.build_for(f, cluster=c, unverified=()) for f in (0, 1) for c in (0, 1)]
        if shape_id.startswith("S"):
            return [d.build_for(False, d.FP8, cluster=c, unverified=()) for c in (0, 1)]
        return [d.build_for(False, d.ROWS, d_qk=512 if shape_id == "P3" else 576, unverified=())]

    todo = [
        compiler.Build.of(name, **{**dict(b.defines), **defines})
        for name, defines in _specs(sources)
        for shape_id in shape_ids
        for b in launched(shape_id)
    ]
    try:
        compiler.precompile(todo, compiler.target_arch(torch.cuda.get_device_capability()))
    except compiler.CompileError as exc:  # (reported again, per run, below)
        print(f"precompile: {str(exc)[-120:]!r}")


def summary(
    times: dict[tuple[str, str], list[float]], sources: list[str], shape_ids: list[str]
) -> str:
    """Per shape, each source's best time over the rounds and its ratio to the first source's."""
    lines = ["best of the rounds, us (x: against the first source)"]
    for shape_id in shape_ids:
        base = min(times.get((sources[0], shape_id), [float("nan")]))
        for source in sources:
            best = min(times.get((source, shape_id), [float("nan")]))
            lines.append(f"  {shape_id} {best:9.1f} {best / base:6.3f}x  {source}")
    return "\n".join(lines)


def main() -> None:
    sources, shape_ids = sys.argv[1].split(","), sys.argv[2].split(",")
    precompile(sources, shape_ids)
    default_build_for = decode_sm90.build_for
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(2):
        for source, (name, defines) in zip(sources, _specs(sources)):

            def build_for(*args, name=name, defines=defines, **kwargs):
                # (the build the launcher asks for, from this source, with these defines on top)
                build = default_build_for(*args, **kwargs)
                return compiler.Build.of(name, **{**dict(build.defines), **defines})

            decode_sm90.build_for = build_for
            for shape_id in shape_ids:
                shape = next(s for s in SHAPES if s.id == shape_id)
                call = runner._call(shape, shape.inputs(torch.device("cuda")))
                try:
                    with flashmla.use_backend("cuda-sm90"):
                        call()
                        ms = triton.testing.do_bench(call, warmup=30, rep=200, return_mode="median")
                except compiler.CompileError as exc:  # (a define this build does not take)
                    print(f"{repeat} {source} {shape_id}: does not compile ({str(exc)[-80:]!r})")
                    continue
                print(f"{repeat} {source} {shape_id}: {ms * 1000:.1f} us", flush=True)
                times.setdefault((source, shape_id), []).append(ms * 1000)
    print(summary(times, sources, shape_ids))


if __name__ == "__main__":
    main()
