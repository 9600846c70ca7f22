"""Host-side logic of the CUDA backend, on the CPU: targets, cache keys, parameter structs and
launch configurations."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from flashmla_cuda import attention, cache_write, compiler, decode_sm90, mha, splitkv
from flashmla_cuda.compiler import Build, target_arch
from flashmla_cuda.launch import F32, I32, I64, PTR, TMAP, pack, struct_type


@pytest.mark.parametrize(
    "cc,arch",
    [((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 9), "sm_89"), ((9, 0), "sm_90a"),
     ((10, 0), "sm_100a"), ((12, 0), "sm_120")],
)  # fmt: skip
def test_target_arch(cc, arch):
    assert target_arch(cc) == arch


def test_target_arch_rejects_old_gpus():
    with pytest.raises(ValueError, match=r"8\.0"):
        target_arch((7, 5))


def test_build_key_tracks_source_target_and_options(tmp_path, monkeypatch):
    b = Build.of("mla_attention.cu", BLOCK_M=64)
    assert b.key("sm_90a") == Build.of("mla_attention.cu", BLOCK_M=64).key("sm_90a")
    assert b.key("sm_90a") != b.key("sm_80")
    assert b.key("sm_90a") != Build.of("mla_attention.cu", BLOCK_M=32).key("sm_90a")
    # an edit to an included header changes the key of every source including it
    for name in ("mla_attention.cu", "common.cuh"):
        (tmp_path / name).write_text((compiler.KERNELS / name).read_text())
    monkeypatch.setattr(compiler, "KERNELS", tmp_path)
    before = b.key("sm_90a")
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edit\n")
    assert b.key("sm_90a") != before


def test_build_options_name_the_target_and_defines():
    opts = Build.of("x.cu", B=2, A=True).options("sm_90a")
    assert opts[0] == "-arch=sm_90a"
    assert opts[-2:] == ("-DA=1", "-DB=2")  # sorted, so equal builds have equal keys


def test_pack_fills_every_field_and_rejects_mistakes():
    dtype = struct_type([("p", PTR), ("n", I32)])
    raw = pack(dtype, {"p": 0x1234, "n": -5})
    assert raw.nbytes == 16  # C pads the struct to its 8-byte alignment too
    back = np.frombuffer(raw.tobytes(), dtype.dtype)[0]
    assert back["p"] == 0x1234 and back["n"] == -5
    with pytest.raises(KeyError, match="missing"):
        pack(dtype, {"p": 1})
    with pytest.raises(KeyError, match="unknown"):
        pack(dtype, {"p": 1, "n": 2, "oops": 3})


def _c_struct(source: str, name: str) -> list[tuple[str, type]]:
    """Fields of ``struct name`` in ``kernels/source`` as (name, launch kind)."""
    text = (compiler.KERNELS / source).read_text()
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S).group(1)
    fields = []
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        decl = " ".join(decl.split())  # declarations may span lines
        if not decl:
            continue
        ctype, names = re.match(r"((?:const )?\w+\s*\*?)\s*(.*)", decl).groups()
        kinds = {"i64": I64, "u64": PTR, "int": I32, "float": F32, "TensorMap": TMAP}
        kind = PTR if "*" in ctype else kinds[ctype.strip()]
        fields += [(n.strip(), kind) for n in names.split(",")]
    return fields


@pytest.mark.parametrize(
    "source,name,layout",
    [
        ("mla_attention.cu", "MlaParams", attention.PARAMS),
        ("splitkv.cu", "ScheduleParams", splitkv.SCHEDULE_PARAMS),
        ("splitkv.cu", "CombineParams", splitkv.COMBINE_PARAMS),
        ("cache_write.cu", "CacheWriteParams", cache_write.PARAMS),
        ("mha.cu", "MhaFwdParams", mha.FWD_PARAMS),
        ("mha.cu", "MhaPrepParams", mha.PREP_PARAMS),
        ("mha.cu", "MhaBwdParams", mha.BWD_PARAMS),
        ("mla_decode_sm90.cu", "DecodeParams", decode_sm90.PARAMS),
    ],
)
def test_param_structs_mirror_c(source, name, layout):
    """Every Python parameter struct matches its C struct field by field (name and kind), so a
    field added on one side only fails here, not as garbage arguments on the GPU."""
    dtype = layout.dtype
    kinds = [
        (n, TMAP if dtype.fields[n][0] == TMAP else dtype.fields[n][0].type) for n in dtype.names
    ]
    assert kinds == _c_struct(source, name)
    assert dtype.itemsize % 8 == 0  # padded to the pointers' alignment, as C does
    assert layout.packer.size == dtype.itemsize


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (9, 0), (10, 0)])
@pytest.mark.parametrize("rows", [1, 16, 17, 32, 33, 64, 128, 256])
@pytest.mark.parametrize("fmt,d_qk", [(0, 576), (0, 512), (1, 576), (2, 512)])
def test_attention_config_fits_shared_memory(cc, rows, fmt, d_qk):
    limit = attention.SMEM_LIMITS.get(cc, 99 * 1024)
    cfg = attention.choose_config(rows, fmt, d_qk, limit)
    assert attention.smem_bytes(cfg, fmt, d_qk) <= limit
    assert cfg.stages >= 2 and (cfg.block_m >= min(rows, 64) or limit < 160 * 1024)
    assert (cfg.block_m // 16) * (cfg.warps // (cfg.block_m // 16)) == cfg.warps


def test_tensor_map_struct_is_64_byte_aligned():
    """A CUtensorMap field comes first and pads the struct to 64 bytes, as C's alignas does;
    a relaunch replaces its 128 bytes in place."""
    layout = struct_type([("map", TMAP), ("p", PTR), ("n", I32)])
    assert layout.itemsize == 192 and layout.packer.size == 192
    raw = pack(layout, {"map": bytes(range(128)), "p": 7, "n": 3}).tobytes()
    assert raw[:128] == bytes(range(128)) and raw[128:136] == (7).to_bytes(8, "little")
    with pytest.raises(ValueError, match="first field"):
        struct_type([("p", PTR), ("map", TMAP)])


def test_sm90_shared_memory_matches_the_kernel_layout():
    """The launcher's size is the kernel's SMEM_BYTES (the kernel traps if given less)."""
    text = (compiler.KERNELS / "mla_decode_sm90.cu").read_text()
    assert "static_assert(SMEM_BYTES <= 227 * 1024" in text
    assert decode_sm90.SMEM_BYTES <= 227 * 1024
    assert decode_sm90.SMEM_BYTES == 3 * 73728 + 512 + 512 + 64 + 1024
    sparse = decode_sm90.SPARSE_SMEM_BYTES
    assert sparse[decode_sm90.FP8] == decode_sm90.SMEM_BYTES + 8192 + 128  # staging, flags
    assert sparse[decode_sm90.ROWS] == decode_sm90.SMEM_BYTES + 128  # flags
    assert max(sparse.values()) <= 227 * 1024


def _e4m3x2_bits(w: int, selector: int) -> int:
    """The kernel's e4m3x2_bits (__byte_perm with a zero second operand, then the masks)."""
    src = w.to_bytes(4, "little") + bytes(4)
    t = int.from_bytes(bytes(src[(selector >> (4 * i)) & 7] for i in range(4)), "little")
    return (t & 0x80008000) | ((t >> 4) & 0x07F007F0)


def test_sparse_dequant_bit_trick_is_exact_for_every_e4m3_value():
    """Every e4m3 byte moved into bf16 bit positions is its value times 2^-120 exactly
    (subnormals and signed zeros included); NaN bytes become finite (masked tokens stay
    finite). Both byte pairs of a word are checked, as the kernel uses both selectors."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for byte in range(256):
        word = byte | (byte ^ 0x5A) << 8 | byte << 16 | (byte ^ 0x5A) << 24
        for selector in (0x1404, 0x3424):  # bytes 0-1 and bytes 2-3 (the same values here)
            pair = _e4m3x2_bits(word, selector)
            for half, b in ((0, byte), (1, byte ^ 0x5A)):
                bits = torch.tensor([(pair >> (16 * half)) & 0xFFFF], dtype=torch.int32)
                got = bits.to(torch.int16).view(torch.bfloat16).float() * 2.0**120
                want = values[b]
                if torch.isnan(want):
                    assert torch.isfinite(got).all()
                else:
                    assert got.item() == want.item() and got.signbit() == want.signbit(), (b, got)


@pytest.mark.parametrize(
    "address,dims,strides,ok",
    [
        (0x1000, (576, 1, 64, 10), (1152, 73728, 73728), True),
        (0x1008, (576, 1, 64, 10), (1152, 73728, 73728), False),  # misaligned base
        (0x1000, (576, 2, 64, 10), (1160, 73728, 73728), False),  # stride not a multiple of 16
        (0x1000, (576, 1, 64, 0), (1152, 73728, 73728), False),  # no pages
    ],
)
def test_tensor_map_rules(address, dims, strides, ok):
    from flashmla_cuda import tma

    assert (tma.check_tiled(address, dims, strides, 2) is None) == ok


@pytest.mark.parametrize("h_kv,contiguous", [(1, True), (2, True), (1, False)])
def test_kv_tensor_map_describes_the_cache(monkeypatch, h_kv, contiguous):
    """The cache [pages, page, h_kv, 576] is mapped as (dim, head, token, page) with its byte
    strides (a strided view keeps its strides), boxes of 64 dims x 1 head x 64 tokens x 1 page."""
    import torch
    from flashmla_cuda import tma

    seen = {}
    monkeypatch.setattr(tma, "encode_tiled", lambda *args: seen.setdefault("args", args) and b"")
    base = torch.zeros(10, 128, h_kv, 576 + (0 if contiguous else 64), dtype=torch.bfloat16)
    cache = base[..., :576]
    decode_sm90.kv_tensor_map(cache)
    address, dims, strides, box = seen["args"]
    assert address == cache.data_ptr()
    assert dims == (576, h_kv, 128, 10) and box == (64, 1, 64, 1)
    assert strides == tuple(2 * s for s in (cache.stride(2), cache.stride(1), cache.stride(0)))


def test_kv_tensor_map_refuses_a_strided_last_dim():
    import torch
    from flashmla_cuda import tma

    cache = torch.zeros(4, 64, 1, 1152, dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(tma.TensorMapError, match="contiguous"):
        decode_sm90.kv_tensor_map(cache)


@pytest.mark.parametrize(
    "page,fmt,d_qk,ok",
    [(64, "bf16", 576, True), (256, "fp16", 576, True), (32, "bf16", 576, False),
     (96, "bf16", 576, False), (64, "fp8_v32", 576, False), (64, "bf16", 512, False)],
)  # fmt: skip
def test_sm90_backend_declares_what_the_kernel_handles(page, fmt, d_qk, ok):
    """Cases the SM90 kernel does not handle get reasons (and fall through to the next
    backend) instead of reaching it."""
    import torch
    from flashmla_cuda import sm90_spec

    from flashmla.formats import CacheFormat
    from flashmla.problems import Facts

    decode = sm90_spec().ops["dense_decode"]
    facts = Facts(
        "dense_decode", torch.device("cpu"), torch.bfloat16, CacheFormat(fmt), (d_qk, 512),
        128, 1, 1, page, None, frozenset(),
    )  # fmt: skip
    reasons = [r for r in decode.reasons(facts) if "runs on" not in r]  # (no GPU here)
    assert (reasons == []) == ok, reasons


@pytest.mark.parametrize(
    "fmt,h_q,features,ok",
    [("fp8_v32", 128, {"attn_sink", "topk_length", "mtp"}, True), ("fp8_v32", 64, set(), True),
     ("fp8_v32", 32, set(), False), ("fp8_model1", 128, {"topk_length"}, True),
     ("bf16", 128, set(), True), ("fp8_v32", 128, {"extra_cache"}, True),
     ("fp8_model1", 64, {"extra_cache", "extra_topk_length"}, True), ("fp8_v32", 96, set(), False)],
)  # fmt: skip
def test_sm90_backend_declares_its_sparse_decode(fmt, h_q, features, ok):
    """What the sparse kernels handle; ranked above Triton (faster on S1-S4)."""
    import torch
    from flashmla_cuda import sm90_spec

    from flashmla.formats import CacheFormat
    from flashmla.problems import Facts

    sparse = sm90_spec().ops["sparse_decode"]
    assert sparse.priority is None and sm90_spec().priority > 20  # (Triton's priority: 20)
    d_qk = 512 if fmt == "fp8_model1" else 576
    facts = Facts(
        "sparse_decode", torch.device("cpu"), torch.bfloat16, CacheFormat(fmt), (d_qk, 512),
        h_q, 1, 2, 64, 2048, frozenset(features),
    )  # fmt: skip
    reasons = [r for r in sparse.reasons(facts) if "runs on" not in r]  # (no GPU here)
    assert (reasons == []) == ok, reasons


def test_sm90_sparse_decode_refuses_what_it_cannot_address():
    """Caches and index lists the kernel cannot read as laid out go to the portable kernel."""
    from flashmla import testing

    inputs = testing.sparse_decode_inputs(2, 1, 64, 64, s_k=100, page_block_size=16, seed=0)
    p = testing.problem_for("decode", inputs)
    assert decode_sm90._sparse_unaddressable(p) is None
    p.indices = torch.zeros(2, 1, 128, dtype=torch.int32)[..., ::2]
    assert "indices" in decode_sm90._sparse_unaddressable(p)


class _FakeLaunch:
    def __init__(self) -> None:
        self.runs: list[dict] = []

    def run(self, pointers=None) -> None:
        self.runs.append(dict(pointers or {}))


def test_sm90_decode_relaunches_with_new_pointers_and_tensor_map(monkeypatch):
    """The first call of a layout launches (and keeps the launches); later calls with other
    tensors of that layout only relaunch, with their pointers and their cache's tensor map."""
    import torch

    from flashmla import testing

    made = []

    def fake_launch(p, q, out, lse, kv, plan):
        made.append(kv)
        return _FakeLaunch(), _FakeLaunch()

    monkeypatch.setattr(decode_sm90, "_launch", fake_launch)
    monkeypatch.setattr(
        decode_sm90, "kv_tensor_map", lambda cache: cache.data_ptr().to_bytes(128, "little")
    )

    plan = types.SimpleNamespace(launches={})  # what relaunch uses of a DecodePlan
    problems = [
        testing.problem_for("decode", testing.dense_decode_inputs(2, 1, 16, 100, seed=s))
        for s in (0, 1)
    ]
    out0, _ = decode_sm90.dense_decode(problems[0], plan)
    assert made == [problems[0].k_cache.data_ptr().to_bytes(128, "little")]
    out1, lse1 = decode_sm90.dense_decode(problems[1], plan)
    assert len(made) == 1  # relaunched, not rebuilt
    ((decode, combine),) = plan.launches.values()
    assert decode.runs == [{
        "kv": problems[1].k_cache.data_ptr().to_bytes(128, "little"),
        "q": problems[1].q.data_ptr(), "out": out1.data_ptr(), "lse": lse1.data_ptr(),
        "block_table": problems[1].block_table.data_ptr(),
        "lengths": problems[1].cache_seqlens.data_ptr(),
    }]  # fmt: skip
    assert combine.runs == [{"out": out1.data_ptr(), "lse": lse1.data_ptr(), "sink": 0}]
    assert out0.data_ptr() != out1.data_ptr() and isinstance(out1, torch.Tensor)


@pytest.mark.parametrize("s_q,parts", [(1, 66), (10, 3), (4096, 66), (70000, 132)])
def test_prefill_metadata_covers_every_query_token_once(s_q, parts):
    """Sparse prefill's schedule: contiguous whole requests per part, none twice, none left."""
    md = decode_sm90.prefill_metadata(s_q, parts, torch.device("cpu"))
    assert md.shape[0] <= parts and md.shape[1] == 8
    covered = torch.cat([torch.arange(int(b), int(e) + 1) for b, e in md[:, :2]])
    assert torch.equal(covered, torch.arange(s_q))
    assert (md[:, 2] == 0).all() and (md[:, 3] >= 1 << 30).all() and (md[:, 4:] == 0).all()


def test_sm90_sparse_decode_relaunches_with_every_pointer(monkeypatch):
    """Later calls of the same layout relaunch with their own pointers, extra cache included;
    every relaunched field exists in the parameter struct."""
    from flashmla import testing

    made = []
    monkeypatch.setattr(
        decode_sm90, "_launch_sparse", lambda *a: made.append(a) or (_FakeLaunch(), _FakeLaunch())
    )
    plan = types.SimpleNamespace(launches={})
    problems = [
        testing.problem_for(
            "decode",
            testing.sparse_decode_inputs(
                2,
                1,
                64,
                64,
                s_k=100,
                cache_format="fp8_model1",
                page_block_size=61,
                extra_topk=64,
                extra_topk_length=True,
                topk_length=True,
                attn_sink=True,
                seed=0,
            ),
        )
        for _ in range(2)
    ]  # fmt: skip  (same shapes, tensors of their own)
    decode_sm90.sparse_decode(problems[0], plan)
    out1, lse1 = decode_sm90.sparse_decode(problems[1], plan)
    assert len(made) == 1
    ((decode, combine),) = plan.launches.values()
    (fields,) = decode.runs
    p = problems[1]
    assert fields["cache2"] == p.extra_k_cache.data_ptr()
    assert fields["list2"] == p.extra_indices.data_ptr()
    assert fields["lengths2"] == p.extra_topk_length.data_ptr()
    assert fields["sink"] == p.attn_sink.data_ptr() and fields["out"] == out1.data_ptr()
    assert set(fields) <= set(decode_sm90.PARAMS.dtype.names)
    assert combine.runs == [{"out": out1.data_ptr(), "lse": lse1.data_ptr(),
                             "sink": p.attn_sink.data_ptr()}]  # fmt: skip


def test_sm90_params_default_every_unused_field_to_zero():
    """Each launch kind names only its fields; the rest pack as zeros, and a misspelt one fails."""
    raw = pack(decode_sm90.PARAMS, decode_sm90._values(h_q=128)).tobytes()
    assert raw[:128] == bytes(128) and len(raw) == decode_sm90.PARAMS.itemsize
    with pytest.raises(KeyError, match="unknown"):
        pack(decode_sm90.PARAMS, decode_sm90._values(hq=128))


@pytest.mark.parametrize(
    "h_q,fmt,env,cluster",
    [(128, "fp8_v32", "", True), (128, "fp8_v32", "1", True), (64, "fp8_v32", "1", False),
     (128, "fp8_model1", "", False), (128, "bf16", "1", False)],
)  # fmt: skip
def test_sm90_sparse_cluster_build_where_two_head_tiles(monkeypatch, h_q, fmt, env, cluster):
    """The FP8 V3.2 sparse decode shares its dequantization across a 2-CTA cluster where the two
    head tiles exist (h_q 128), with or without the unverified switch; no other layout does."""
    from flashmla import testing

    monkeypatch.setenv("FLASHMLA_CUDA_SM90_UNVERIFIED", env)
    seen = {}
    monkeypatch.setattr(
        decode_sm90, "_run", lambda build, grid, *a: seen.update(build=build, grid=grid)
    )
    inputs = testing.sparse_decode_inputs(1, 1, h_q, 64, s_k=100, cache_format=fmt, seed=0)
    p = testing.problem_for("decode", inputs)
    schedule = types.SimpleNamespace(
        metadata=torch.zeros(4, 8, dtype=torch.int32), num_splits=torch.zeros(2, dtype=torch.int32)
    )
    plan = types.SimpleNamespace(schedule=schedule, o_acc=torch.zeros(1), lse_acc=torch.zeros(1))
    decode_sm90._launch_sparse(p, p.q, *p.empty_outputs(), plan)
    assert (("CLUSTER", 1) in seen["build"].defines) == cluster
    assert seen["grid"][0] == h_q // decode_sm90.BLOCK


@pytest.mark.parametrize(
    "env,sparse,cluster,model1,expected",
    [("", decode_sm90.FP8, False, False, "FP8_PAIRS"), ("", decode_sm90.FP8, True, False, ""),
     ("", decode_sm90.FP8, False, True, ""), ("fp8_pairs", decode_sm90.FP8, True, False, "FP8_PAIRS"),
     ("fp8_pairs", decode_sm90.FP8, False, True, "FP8_PAIRS"), ("", decode_sm90.ROWS, False, False, ""),
     ("pipe", decode_sm90.FP8, False, False, "PIPE"), ("pipe", decode_sm90.FP8, True, False, "PIPE"),
     ("1", decode_sm90.ROWS, False, False, "PIPE,PV_FIRST,PREFETCH_IDX"),
     ("1", decode_sm90.FP8, False, False, "PIPE,PV_FIRST,PREFETCH_IDX,REG_STAGE"),
     ("1", decode_sm90.FP8, True, False, "PIPE,PV_FIRST,PREFETCH_IDX,REG_STAGE"),
     ("1", decode_sm90.FP8, False, True, "PIPE,PV_FIRST,PREFETCH_IDX,REG_STAGE"),
     ("reg_stage", decode_sm90.FP8, False, False, "FP8_PAIRS"), ("pipe", 0, False, False, ""),
     ("pv_first", decode_sm90.FP8, False, False, "FP8_PAIRS"), ("pipe,pv_first", decode_sm90.ROWS, False, False, "PIPE,PV_FIRST"),
     ("prefetch_idx", decode_sm90.ROWS, False, False, ""),
     ("pipe,prefetch_idx", decode_sm90.ROWS, False, False, "PIPE,PREFETCH_IDX")],
)  # fmt: skip
def test_sm90_unverified_sparse_variants_only_on_request(
    monkeypatch, env, sparse, cluster, model1, expected
):
    """The sparse variants not yet measured faster are built only when asked for: FP8_PAIRS
    is the default only where measured (V3.2 without the cluster), PIPE (a sparse schedule,
    never for dense decode) only on request, and then without FP8_PAIRS; PV_FIRST,
    PREFETCH_IDX and REG_STAGE (FP8) only with PIPE."""
    monkeypatch.setenv("FLASHMLA_CUDA_SM90_UNVERIFIED", env)
    defines = dict(decode_sm90.build_for(False, sparse, cluster=cluster, model1=model1).defines)
    variants = {"FP8_PAIRS", "PIPE", "PV_FIRST", "PREFETCH_IDX", "REG_STAGE"} & set(defines)
    assert variants == set(filter(None, expected.split(",")))
