"""Time every available backend on the benchmark shapes, check each against the reference."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import api, testing
from ..registry import REGISTRY, describe_device, use_backend
from .overhead import dispatch_overhead_us
from .shapes import SHAPES, Shape, cpu_shapes

SDPA = "torch-sdpa"  # the peer for dense MHA prefill, timed in the same run


@dataclass
class Result:
    shape: str
    title: str
    backend: str
    time_us: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    max_error: float | None = None
    ok: bool | None = None  # within FlashMLA's tolerances of the fp32 reference
    vs_fastest: float | None = None  # time / fastest time on this shape
    vs_flashmla: float | None = None  # time / the reference library's H200 time
    note: str = ""


# --------------------------------------------------------------------------------------------
# Timing


def time_us(fn: Callable[[], Any], device: torch.device) -> float:
    """Median time of ``fn`` in microseconds. On CUDA this is ``triton.testing.do_bench``
    (warm-up 30 ms, 200 ms of repeats, L2 cleared between repeats), how ``spec/performance.md``
    measured the reference library; without triton, the same procedure with CUDA events."""
    if device.type != "cuda":
        fn()
        times = []
        deadline = time.perf_counter() + 0.2
        while time.perf_counter() < deadline or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events_median(fn) * 1e3
    return do_bench(fn, warmup=30, rep=200, return_mode="median") * 1e3


def _cuda_events_median(fn: Callable[[], Any], warmup_ms: float = 30, rep_ms: float = 200) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 5
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    events = []
    for _ in range(max(1, int(rep_ms / estimate))):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def machine_ceilings(device: torch.device) -> dict[str, float]:
    """What this GPU does on a plain copy and a large bf16 GEMM, measured now."""
    if device.type != "cuda":
        return {}
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_us = time_us(lambda: a @ a, device)
    return {"copy_gbps": 2 * 2 * n / copy_us / 1e3, "bf16_gemm_tflops": 2 * 8192**3 / gemm_us / 1e6}


# --------------------------------------------------------------------------------------------
# One shape


def _call(shape: Shape, inputs: dict[str, Any]) -> Callable[[], Any]:
    if shape.op == "decode":
        return lambda: api.flash_mla_with_kvcache(**inputs)
    if shape.op == "sparse_prefill":
        return lambda: api.flash_mla_sparse_fwd(**inputs)
    if shape.op == "mha_forward":
        return lambda: api.flash_attn_varlen_func(**inputs)
    grad = torch.randn_like(inputs["q"][..., : inputs["v"].shape[-1]])

    def train() -> Any:
        out, _ = api.flash_attn_varlen_func(**inputs)
        out.backward(grad)
        return out

    return train


def each_call(
    shape_ids: str, backends: str, device: torch.device
) -> Iterator[tuple[str, str, Callable[[], Any]]]:
    """``(shape id, backend, call)`` for comma-separated shape ids and backend names (for the
    measuring scripts under ``benchmarks/``): each call runs the shape's op on fresh inputs under
    that backend, decode with a schedule of its own. Run it before advancing the iterator (the
    backend is forced only until then)."""
    for shape_id in shape_ids.split(","):
        shape = next(s for s in SHAPES if s.id == shape_id)
        inputs = shape.inputs(device)
        for backend in backends.split(","):
            with use_backend(backend):
                if shape.op == "decode":
                    inputs["tile_scheduler_metadata"] = api.get_mla_metadata()[0]
                yield shape_id, backend, _call(shape, inputs)


def _sdpa_call(shape: Shape, inputs: dict[str, Any]) -> Callable[[], Any]:
    """torch SDPA on the same (equal-length) sequences as ``[b, h, s, d]`` tensors."""
    b = inputs["cu_seqlens_qo"].shape[0] - 1

    def split(t: torch.Tensor) -> torch.Tensor:
        return (
            t.detach()
            .view(b, -1, *t.shape[1:])
            .transpose(1, 2)
            .contiguous()
            .requires_grad_(t.requires_grad)
        )

    q, k, v = split(inputs["q"]), split(inputs["k"]), split(inputs["v"])
    kw = dict(is_causal=inputs["causal"], scale=inputs["softmax_scale"])
    if shape.op == "mha_forward":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    grad = torch.randn(b, q.shape[1], q.shape[2], v.shape[3], device=q.device, dtype=q.dtype)

    def train() -> Any:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        out.backward(grad)
        return out

    return train


def _check(shape: Shape, result: Any, ref: tuple[torch.Tensor, ...]) -> tuple[float, bool]:
    names = {"decode": ("out", "lse"), "sparse_prefill": ("out", "max_logits", "lse")}.get(
        shape.op, ("out", "lse")
    )
    tol_op = {"decode": "sparse_decode" if shape.params.get("topk") else "dense_decode"}.get(
        shape.op, shape.op
    )
    tolerances = testing.TOLERANCES.get(tol_op, testing.TOLERANCES["mha"])
    outputs = result if isinstance(result, tuple) else (result,)
    err, ok = 0.0, True
    for name, got, want in zip(names, outputs, ref):
        err = max(err, testing.max_error(got, want)) if name == "out" else err
        ok = ok and not testing.compare(got, want, *tolerances[name])
    return err, ok


def bench_shape(
    shape: Shape,
    device: torch.device,
    backends: Sequence[str] | None,
    check: bool,
    report: Callable[[str], None],
) -> list[Result]:
    inputs = shape.inputs(device)
    flop, nbytes = shape.work(inputs)
    ref_op = "mha_forward" if shape.op == "mha_train" else shape.op
    facts = testing.problem_for(ref_op, inputs).facts
    if shape.op == "mha_train":
        facts = testing.problem_for("mha_backward", inputs).facts
    ref = testing.reference(ref_op, inputs) if check else None
    results = []
    candidates = [b for b in REGISTRY.backends().values() if backends is None or b.name in backends]
    for backend in sorted(candidates, key=lambda b: -b.priority(facts.op)):
        reasons = backend.reasons(facts)
        if reasons:
            if backends is not None:
                results.append(Result(shape.id, shape.title, backend.name, note="; ".join(reasons)))
            continue
        report(f"{shape.id} {backend.name}")
        results.append(_measure(shape, backend.name, inputs, flop, nbytes, ref, device))
    if shape.op.startswith("mha") and (backends is None or SDPA in backends):
        report(f"{shape.id} {SDPA}")
        t = time_us(_sdpa_call(shape, inputs), device)
        results.append(Result(shape.id, shape.title, SDPA, t, flop / t / 1e6, nbytes / t / 1e3))
    fastest = min((r.time_us for r in results if r.time_us), default=None)
    for r in results:
        if r.time_us:
            r.vs_fastest = r.time_us / fastest
            if shape.flashmla_us and device.type == "cuda":
                r.vs_flashmla = r.time_us / shape.flashmla_us
    return results


def _measure(shape, name, inputs, flop, nbytes, ref, device) -> Result:
    result = Result(shape.id, shape.title, name)
    try:
        with use_backend(name):
            if shape.op == "decode":
                inputs = dict(inputs, tile_scheduler_metadata=api.get_mla_metadata()[0])
            fn = _call(shape, inputs)
            out = fn()
            if ref is not None:
                checked = out if shape.op != "mha_train" else api.flash_attn_varlen_func(**inputs)
                result.max_error, result.ok = _check(shape, checked, ref)
            t = time_us(fn, device)
    except Exception as exc:  # a failing backend is a row in the table, not the end of the run
        result.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return result
    result.time_us, result.tflops, result.gbps = t, flop / t / 1e6, nbytes / t / 1e3
    return result


# --------------------------------------------------------------------------------------------
# The whole run


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    for mod in ("triton", "cupy", "numba"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    for name, backend in REGISTRY.backends().items():  # backends, not packages: one package
        versions[f"backend {name}"] = backend.spec.version  # (flashmla-cuda) may register two
    return versions


def run(
    shape_ids: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    device: str | None = None,
    check: bool = True,
    json_path: str | None = None,
    out=sys.stdout,
) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = SHAPES if dev.type == "cuda" else cpu_shapes()
    if shape_ids:
        wanted = {s.upper() for s in shape_ids}
        shapes = tuple(s for s in shapes if s.id in wanted)
    progress = _Progress(len(shapes))
    ceilings = machine_ceilings(dev)
    overhead = dispatch_overhead_us(dev)
    results: list[Result] = []
    started = time.time()
    for shape in shapes:
        progress.step(shape.id)
        try:
            results.extend(bench_shape(shape, dev, backends, check, progress.note))
        except torch.cuda.OutOfMemoryError as exc:
            results.append(Result(shape.id, shape.title, "-", note=f"out of memory: {exc}"[:200]))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    progress.done()
    report = {
        "device": describe_device(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": software_versions(),
        "ceilings": ceilings,
        "dispatch_overhead_us": overhead,
        "scaled_down": dev.type != "cuda",
        "seconds": round(time.time() - started, 1),
        "results": [asdict(r) for r in results],
    }
    print_table(report, out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {json_path}", file=out)
    return report


def print_table(report: dict[str, Any], out=sys.stdout) -> None:
    ceil = report["ceilings"]
    print(
        f"\nflashmla bench on {report['device']}  ({report['date']}, {report['seconds']} s)",
        file=out,
    )
    if ceil:
        print(
            f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 GEMM {ceil['bf16_gemm_tflops']:.0f} TFLOP/s",
            file=out,
        )
    print(
        f"python-side cost per decode call (validation + dispatch): {report['dispatch_overhead_us']:.1f} us",
        file=out,
    )
    if report["scaled_down"]:
        print(
            "no GPU: the reference backend on scaled-down shapes (times are not comparable)",
            file=out,
        )
    head = f"{'shape':5} {'backend':10} {'time us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%copy':>6} {'vs best':>7} {'vs FlashMLA':>11} {'max err':>8} ok"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in report["results"]:
        if r["time_us"] is None:
            print(f"{r['shape']:5} {r['backend']:10} {'-':>9}  {r['note']}", file=out)
            continue
        pct = f"{100 * r['gbps'] / ceil['copy_gbps']:.0f}%" if ceil else "-"
        vs = f"{r['vs_flashmla']:.2f}x" if r["vs_flashmla"] else "-"
        err = f"{r['max_error']:.1e}" if r["max_error"] is not None else "-"
        ok = {True: "yes", False: "NO", None: "-"}[r["ok"]]
        print(
            f"{r['shape']:5} {r['backend']:10} {r['time_us']:9.1f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
            f"{pct:>6} {r['vs_fastest']:6.2f}x {vs:>11} {err:>8} {ok}",
            file=out,
        )


class _Progress:
    """A progress bar on a terminal; one line per step otherwise (logs stay readable)."""

    def __init__(self, total: int) -> None:
        self.total, self.count, self.tty = total, 0, sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.count += 1
        self.note(label)

    def note(self, label: str) -> None:
        if self.tty:
            filled = int(30 * self.count / max(self.total, 1))
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total} {label:<24}"
            )
            sys.stderr.flush()
        else:
            print(f"  [{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
