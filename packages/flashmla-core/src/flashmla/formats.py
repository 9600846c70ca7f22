"""KV-cache formats: plain bf16/fp16 rows and the two FP8 block-scale layouts (contract §5).

``fp8_v32`` (DeepSeek-V3.2, d_qk = 576, 656 bytes per token, token-interleaved)::

    bytes [0, 512)    512 x e4m3 NoPE values, quantized in 4 tiles of 128
    bytes [512, 528)  4 x float32 scales, one per tile
    bytes [528, 656)  64 x bf16 RoPE values, stored as they are

``fp8_model1`` (d_qk = d_v = 512, 584 bytes per token, block-planar). A page of B tokens is one
contiguous run of ``584 * B`` bytes: first B token records of 576 bytes (448 x e4m3 NoPE then
64 x bf16 RoPE), then B scale records of 8 bytes (7 x UE8M0 exponents for tiles of 64, 1 pad).
So the torch view ``[num_blocks, B, 1, 584]`` is only a byte container: its row t is *not* token t.

Scales are powers of two: ``s = 2 ** ceil(log2(max(amax / 448, 1e-4)))``, so dequantization
``bf16(fp8) * bf16(s)`` is exact and every kernel agrees bit for bit.
"""

from __future__ import annotations

import enum

import torch

from .errors import DTypeError, LayoutError, ShapeError

FP8_MAX = 448.0
MIN_SCALE_RATIO = 1e-4

FP8_CONTAINER_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)


class CacheFormat(str, enum.Enum):
    """How one cached token is stored."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8_V32 = "fp8_v32"
    FP8_MODEL1 = "fp8_model1"

    @property
    def is_fp8(self) -> bool:
        return self in (CacheFormat.FP8_V32, CacheFormat.FP8_MODEL1)

    @property
    def head_dim(self) -> int | None:
        """d_qk fixed by an FP8 layout (None for plain caches, whose rows are any width)."""
        return {CacheFormat.FP8_V32: 576, CacheFormat.FP8_MODEL1: 512}.get(self)

    @property
    def bytes_per_token(self) -> int | None:
        return {CacheFormat.FP8_V32: 656, CacheFormat.FP8_MODEL1: 584}.get(self)

    def __str__(self) -> str:
        return self.value


FP8_FORMAT_BY_WIDTH = {656: CacheFormat.FP8_V32, 584: CacheFormat.FP8_MODEL1}
PLAIN_FORMAT_BY_DTYPE = {torch.bfloat16: CacheFormat.BF16, torch.float16: CacheFormat.FP16}


def detect_cache_format(argument: str, cache: torch.Tensor, is_fp8: bool) -> CacheFormat:
    """The format of a ``[num_blocks, B, h_kv, width]`` cache tensor, or a typed error."""
    if is_fp8:
        if cache.dtype not in FP8_CONTAINER_DTYPES:
            raise DTypeError(
                argument,
                "an FP8 cache must be float8_e4m3fn, int8 or uint8 bytes",
                cache.dtype,
            )
        fmt = FP8_FORMAT_BY_WIDTH.get(int(cache.shape[-1]))  # int(): SymInts are not hashable
        if fmt is None:
            raise ShapeError(
                argument,
                "an FP8 cache's last dim must be 656 (V3.2 layout) or 584 (MODEL1 layout) bytes",
                tuple(cache.shape),
            )
        if cache.shape[2] != 1:
            raise ShapeError(
                argument, "FP8 caches hold one KV head (shape[2] == 1)", cache.shape[2]
            )
        if cache.stride(-1) != 1 or cache.stride(1) != cache.shape[-1]:
            raise LayoutError(
                argument,
                "the tokens of one FP8 page must be contiguous (stride(1) == bytes per token, "
                "stride(-1) == 1)",
                tuple(cache.stride()),
            )
        return fmt
    fmt = PLAIN_FORMAT_BY_DTYPE.get(cache.dtype)
    if fmt is None:
        raise DTypeError(
            argument,
            "a plain cache must be bfloat16 or float16 (pass is_fp8_kvcache=True for FP8 bytes)",
            cache.dtype,
        )
    return fmt


# --------------------------------------------------------------------------------------------
# Scales


def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """The contract's scale for a tile whose largest magnitude is ``amax`` (float32)."""
    ratio = torch.clamp(amax.float() / FP8_MAX, min=MIN_SCALE_RATIO)
    return torch.exp2(torch.ceil(torch.log2(ratio)))


def _quantize_tiles(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x[..., n]`` into tiles of ``tile``; return (e4m3 bytes [..., n], scales [..., n/tile])."""
    xf = x.float().unflatten(-1, (-1, tile))
    scale = power_of_two_scale(xf.abs().amax(dim=-1))
    q = (xf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return q.flatten(-2).view(torch.uint8), scale


def _dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """``bf16(fp8) * bf16(scale)`` rounded to bf16, as Hopper kernels compute it."""
    values = q.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, tile))
    scale = scale.to(torch.bfloat16).float().unsqueeze(-1)
    return (values * scale).flatten(-2).to(torch.bfloat16)


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).contiguous().view(torch.uint8)


# --------------------------------------------------------------------------------------------
# V3.2: one self-contained 656-byte record per token


def quantize_v32(x: torch.Tensor) -> torch.Tensor:
    """Quantize tokens ``x[..., 576]`` into 656-byte V3.2 records ``uint8[..., 656]``."""
    if x.shape[-1] != 576:
        raise ShapeError("x", "the V3.2 FP8 layout stores 576-dim tokens", tuple(x.shape))
    nope, scale = _quantize_tiles(x[..., :512], 128)
    scale_bytes = scale.contiguous().view(torch.uint8)
    return torch.cat([nope, scale_bytes, _bf16_bytes(x[..., 512:])], dim=-1)


def dequantize_v32(records: torch.Tensor) -> torch.Tensor:
    """Decode 656-byte V3.2 records ``[..., 656]`` (any byte dtype) into bf16 ``[..., 576]``."""
    r = records.contiguous().view(torch.uint8)
    scale = r[..., 512:528].contiguous().view(torch.float32)
    nope = _dequantize_tiles(r[..., :512], scale, 128)
    rope = r[..., 528:656].contiguous().view(torch.bfloat16)
    return torch.cat([nope, rope], dim=-1)


# --------------------------------------------------------------------------------------------
# MODEL1: per token a 576-byte record (NoPE e4m3 + RoPE bf16) and an 8-byte scale record;
# the scale records of a page sit after all its token records.

MODEL1_TOKEN_BYTES = 576
MODEL1_SCALE_BYTES = 8


def quantize_model1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize tokens ``x[..., 512]`` into (token records ``uint8[..., 576]``, scale records
    ``uint8[..., 8]``): 7 UE8M0 exponents for the NoPE tiles of 64, then one zero pad byte."""
    if x.shape[-1] != 512:
        raise ShapeError("x", "the MODEL1 FP8 layout stores 512-dim tokens", tuple(x.shape))
    nope, scale = _quantize_tiles(x[..., :448], 64)
    exponents = (torch.log2(scale).round().to(torch.int32) + 127).to(torch.uint8)
    pad = torch.zeros_like(exponents[..., :1])
    record = torch.cat([nope, _bf16_bytes(x[..., 448:])], dim=-1)
    return record, torch.cat([exponents, pad], dim=-1)


def ue8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    return torch.exp2(exponents.to(torch.float32) - 127.0)


def dequantize_model1(record: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode MODEL1 token records ``[..., 576]`` with their scale records ``[..., 8]`` (any
    byte dtype: the UE8M0 exponents are read as unsigned bytes)."""
    exponents = scales[..., :7].view(torch.uint8)
    nope = _dequantize_tiles(record[..., :448], ue8m0_to_float(exponents), 64)
    rope = record[..., 448:576].contiguous().view(torch.bfloat16)
    return torch.cat([nope, rope], dim=-1)


# --------------------------------------------------------------------------------------------
# Token access by flat slot (slot = physical_block * page_size + offset)


def _page_bytes(cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, B * 584]`` byte view of a MODEL1 cache (each page is contiguous)."""
    nb, bsz = cache.shape[0], cache.shape[1]
    return cache.view(torch.uint8).view(nb, bsz * 584)


def _model1_offsets(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    bsz = cache.shape[1]
    block, offset = slots // bsz, slots % bsz
    record = offset * MODEL1_TOKEN_BYTES
    scale = bsz * MODEL1_TOKEN_BYTES + offset * MODEL1_SCALE_BYTES
    return block, record, scale


def read_tokens(cache: torch.Tensor, slots: torch.Tensor, fmt: CacheFormat) -> torch.Tensor:
    """Gather (and dequantize) the tokens at ``slots`` (all valid) of a paged cache.

    Returns ``[*slots.shape, h_kv, d]`` in the cache's dtype (bf16 for FP8 formats, h_kv = 1)."""
    slots = slots.long()
    bsz = cache.shape[1]
    if fmt is CacheFormat.FP8_V32:
        rows = cache.view(torch.uint8)[:, :, 0, :]
        return dequantize_v32(rows[slots // bsz, slots % bsz]).unsqueeze(-2)
    if fmt is CacheFormat.FP8_MODEL1:
        pages = _page_bytes(cache)
        block, rec, sc = _model1_offsets(cache, slots)
        rec_idx = rec.unsqueeze(-1) + torch.arange(MODEL1_TOKEN_BYTES, device=slots.device)
        sc_idx = sc.unsqueeze(-1) + torch.arange(MODEL1_SCALE_BYTES, device=slots.device)
        blk = block.unsqueeze(-1)
        return dequantize_model1(pages[blk, rec_idx], pages[blk, sc_idx]).unsqueeze(-2)
    return cache[slots // bsz, slots % bsz]


def write_tokens(
    cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, fmt: CacheFormat
) -> None:
    """Store ``values[n, h_kv, d]`` at flat ``slots[n]`` (all valid), quantizing for FP8."""
    slots = slots.long()
    bsz = cache.shape[1]
    block, offset = slots // bsz, slots % bsz
    if fmt is CacheFormat.FP8_V32:
        cache.view(torch.uint8)[block, offset, 0, :] = quantize_v32(values[:, 0, :])
    elif fmt is CacheFormat.FP8_MODEL1:
        record, scales = quantize_model1(values[:, 0, :])
        pages = _page_bytes(cache)
        _, rec, sc = _model1_offsets(cache, slots)
        rec_idx = rec.unsqueeze(-1) + torch.arange(MODEL1_TOKEN_BYTES, device=slots.device)
        sc_idx = sc.unsqueeze(-1) + torch.arange(MODEL1_SCALE_BYTES, device=slots.device)
        pages[block.unsqueeze(-1), rec_idx] = record
        pages[block.unsqueeze(-1), sc_idx] = scales
    else:
        cache[block, offset] = values.to(cache.dtype)
