"""Every compiled variant the package launches, by kernel family (CI compiles them all)."""

from __future__ import annotations

from .compiler import Build


def all_builds(cc: tuple[int, int]) -> dict[str, list[Build]]:
    """``{family: builds}`` for a device of compute capability ``cc``. The ``attention`` family
    and ``decode_sm90`` families hold the decode kernels, which must never spill."""
    from . import attention, cache_write, decode_sm90, mha, splitkv

    return {
        "attention": attention.builds(cc),
        "decode_sm90": decode_sm90.builds(cc),
        "splitkv": splitkv.builds(cc),
        "cache_write": cache_write.builds(cc),
        "mha": mha.builds(cc),
    }
