"""Host checks of the split-KV and cache-write kernels, on the CPU.

* The kernels' sequential logic, compiled for the host by a C++ compiler (skipped without one):
  the schedule kernel run by one thread (with tiny staging chunks, so the chunked walk is
  exercised) against :func:`flashmla.scheduler.split_kv_schedule`, and the FP8 quantization
  helpers against torch's ``float8_e4m3fn`` cast and :mod:`flashmla.formats`.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
from flashmla_cuda.compiler import KERNELS

from flashmla import formats, scheduler

CXX = shutil.which("c++") or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

# -------------------------------------------------------------------------------------------
# Host builds of kernel sections

_SHIM = r"""
#include <algorithm>
#include <cstring>
using std::max;
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
#define DEV static inline
#define __global__
#define __launch_bounds__(x)
#define __shared__ static
static struct { int x; } threadIdx = {0};
#define __syncthreads()
static unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  unsigned long long o = *a; *a += v; return o;
}
static inline u32 __float_as_uint(float f) { u32 u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline float bf16_to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }
"""


def _section(source: str, title: str) -> str:
    text = (KERNELS / source).read_text()
    start = text.index(f"// {title}\n")
    end = text.find("// ----", start)
    return text[start : end if end >= 0 else len(text)]


def _host_lib(tmp_path, name: str, code: str) -> ctypes.CDLL:
    src = tmp_path / f"{name}.cpp"
    src.write_text(code)
    lib = tmp_path / f"{name}.so"
    subprocess.run([CXX, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return ctypes.CDLL(str(lib))


class _ScheduleParams(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_void_p) for n in ("lengths", "extra_lengths", "metadata", "num_splits")
    ] + [
        (n, ctypes.c_int)
        for n in ("b", "num_parts", "sparse", "topk", "has_extra", "extra_topk", "overhead")
    ]


@pytest.fixture(scope="module")
def schedule_libs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    section = _section("splitkv.cu", "Schedule")
    return [
        _host_lib(
            tmp,
            f"sched{chunk}",
            f"#define SCHED_THREADS 1\n#define SCHED_CHUNK {chunk}\n"
            f"constexpr int SCHED_BLOCK = 64;\n{_SHIM}{section}",
        )
        for chunk in (8192, 1, 3, 16)
    ]


def _schedule(lib, b, parts, *, seqlens=None, topk=0, tl=None, extra_topk=None, etl=None):
    md = torch.full((parts, 8), -7, dtype=torch.int32)
    ns = torch.full((b + 1,), -7, dtype=torch.int32)
    sparse = seqlens is None
    keep = [
        None if t is None else t.to(torch.int32).contiguous()
        for t in (tl if sparse else seqlens, etl)
    ]
    params = _ScheduleParams(
        *(None if t is None else t.data_ptr() for t in keep), md.data_ptr(), ns.data_ptr(),
        b, parts, int(sparse), topk, int(sparse and extra_topk is not None),
        extra_topk or 0, scheduler.OVERHEAD_BLOCKS,
    )  # fmt: skip
    lib.schedule(params)
    return md, ns


@needs_cxx
@pytest.mark.parametrize("seed", range(8))
def test_schedule_matches_core(schedule_libs, seed):
    rng = random.Random(seed)
    for it in range(150):
        lib = schedule_libs[it % len(schedule_libs)]
        b, parts = rng.randint(0, 50), rng.randint(1, 140)
        if rng.random() < 0.5:
            picks = [0, 1, 63, 64, 65, 127, 128, 4096]
            lengths = torch.tensor(
                [rng.choice([*picks, rng.randint(0, 20000)]) for _ in range(b)], dtype=torch.int32
            )
            md, ns = _schedule(lib, b, parts, seqlens=lengths)
        else:
            topk = rng.choice([1, 64, 128, 2048])
            tl = None
            if rng.random() < 0.7:
                tl = torch.tensor([rng.randint(0, topk) for _ in range(b)], dtype=torch.int32)
            extra_topk = rng.choice([None, 64, 512])
            etl = None
            if extra_topk and rng.random() < 0.5:
                etl = torch.tensor(
                    [rng.randint(0, extra_topk) for _ in range(b)], dtype=torch.int32
                )
            md, ns = _schedule(lib, b, parts, topk=topk, tl=tl, extra_topk=extra_topk, etl=etl)
            lengths = scheduler.sparse_lengths(topk, tl, extra_topk, etl, b, torch.device("cpu"))
        want = scheduler.split_kv_schedule(lengths, parts)
        assert torch.equal(md, want.metadata), (b, parts, lengths.tolist())
        assert torch.equal(ns, want.num_splits), (b, parts, lengths.tolist())


@needs_cxx
def test_schedule_worked_example(schedule_libs):
    md, ns = _schedule(schedule_libs[0], 2, 4, seqlens=torch.tensor([1000, 64]))
    assert md[:, :4].tolist() == [[0, 0, 0, 7], [0, 0, 7, 14], [0, 0, 14, 16], [1, 1, 0, 1]]
    assert ns.tolist() == [0, 3, 4]


@needs_cxx
def test_schedule_many_requests_crosses_chunks(schedule_libs):
    lengths = torch.randint(0, 9000, (20000,), generator=torch.Generator().manual_seed(1))
    md, ns = _schedule(schedule_libs[0], 20000, 132, seqlens=lengths)
    want = scheduler.split_kv_schedule(lengths, 132)
    assert torch.equal(md, want.metadata) and torch.equal(ns, want.num_splits)


# -------------------------------------------------------------------------------------------
# FP8 quantization helpers

_QUANT_API = r"""
extern "C" void e4m3_many(const float* v, unsigned char* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = (unsigned char)e4m3_bits(v[i]);
}
extern "C" void exponent_many(const unsigned short* a, int* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = scale_exponent(a[i]);
}
extern "C" void quantize_tile(const u32* w, int k, u32* q) {
  u32 ww[8], qq[4];
  for (int i = 0; i < 8; ++i) ww[i] = w[i];
  quantize16(ww, k, qq);
  for (int i = 0; i < 4; ++i) q[i] = qq[i];
}
"""


@pytest.fixture(scope="module")
def quant_lib(tmp_path_factory):
    section = _section("cache_write.cu", "FP8 quantization")
    return _host_lib(tmp_path_factory.mktemp("quant"), "quant", _SHIM + section + _QUANT_API)


def _vp(a) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data)


@needs_cxx
def test_e4m3_matches_torch(quant_lib):
    """Every bf16 value scaled by every power-of-two scale the writer picks, and a grid of
    fp32 values, all within +-448."""
    bf16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[torch.isfinite(bf16)]
    scaled = [bf16 / 2.0**k for k in range(-13, 121, 3)]
    grid = torch.arange(0, 0x43E00001, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    v = torch.cat([*scaled, grid, -grid])
    v = v[v.abs() <= 448].contiguous()
    got = np.empty(v.numel(), np.uint8)
    quant_lib.e4m3_many(_vp(v), _vp(got), ctypes.c_long(v.numel()))
    want = v.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert (got == want).all(), v[torch.from_numpy(got != want)][:8]


@needs_cxx
def test_scale_exponent_matches_formats(quant_lib):
    amax16 = np.arange(0, 0x7F80, dtype=np.uint16)  # every finite non-negative bf16
    got = np.empty(amax16.size, np.int32)
    quant_lib.exponent_many(_vp(amax16), _vp(got), ctypes.c_long(amax16.size))
    amax = torch.from_numpy(amax16.astype(np.int16)).view(torch.bfloat16).float()
    scale = formats.power_of_two_scale(amax)
    assert torch.equal(torch.exp2(torch.from_numpy(got).float()), scale)


def _v32_like_kernel(lib, x: torch.Tensor) -> bytes:
    """A V3.2 record assembled as the kernel's lanes do (lane l: values 16 l .. 16 l + 15)."""
    bits = x.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    words = (bits[0::2] | (bits[1::2] << 16)).astype(np.uint32)  # 288 words
    record = bytearray(656)
    for tile in range(4):
        amax = np.array([(bits[128 * tile : 128 * tile + 128] & 0x7FFF).max()], np.uint16)
        k = np.empty(1, np.int32)
        lib.exponent_many(_vp(amax), _vp(k), ctypes.c_long(1))
        for lane in range(8 * tile, 8 * tile + 8):
            w = np.ascontiguousarray(words[8 * lane : 8 * lane + 8])
            q = np.empty(4, np.uint32)
            lib.quantize_tile(_vp(w), ctypes.c_int(int(k[0])), _vp(q))
            record[16 * lane : 16 * lane + 16] = q.tobytes()
        record[512 + 4 * tile : 516 + 4 * tile] = ((int(k[0]) + 127) << 23).to_bytes(4, "little")
    record[528:] = bits[512:].astype(np.uint16).tobytes()
    return bytes(record)


@needs_cxx
def test_v32_record_matches_formats(quant_lib):
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        x = torch.randn(576, generator=g) * 10.0 ** torch.empty(1).uniform_(-8, 6, generator=g)
        if i % 5 == 0:
            x[:128] = 0  # an all-zero tile: the 1e-4 clamp
        if i % 7 == 0:
            x[128:256] *= 1e-30  # bf16 subnormals
        x = x.to(torch.bfloat16)
        want = formats.quantize_v32(x.unsqueeze(0))[0].numpy().tobytes()
        assert _v32_like_kernel(quant_lib, x) == want, i


# -------------------------------------------------------------------------------------------
# Combine launch shape


def test_combine_piece_warps_spread_long_splits():
    """One long request (D7: 66 pieces) gets all 8 warps of a CTA per head, each loading about 8
    pieces at once; requests of a few pieces keep one warp per head; W divides the CTA."""
    from flashmla_cuda.splitkv import COMBINE_UNROLL, COMBINE_WARPS, combine_piece_warps

    assert combine_piece_warps(66, 1) == 8
    assert combine_piece_warps(132 + 66, 132) == 1
    assert combine_piece_warps(40, 2) == 2
    assert all(COMBINE_WARPS % combine_piece_warps(s, 1) == 0 for s in range(1, 300))
    source = (KERNELS / "splitkv.cu").read_text()
    assert f"constexpr int COMBINE_UNROLL = {COMBINE_UNROLL};" in source
