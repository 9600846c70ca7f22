"""Run-time compilation of the package's CUDA C++ sources.

A :class:`Build` names one source file under ``kernels/`` and the preprocessor defines that pick
its variant (tile sizes, cache format, dtype). It compiles for one explicit target: ``sm_90a`` on
compute capability 9.0 and ``sm_100a`` on 10.0 (their architecture-specific instructions need the
``a``), plain ``sm_XY`` elsewhere. The result (a cubin) is cached in memory and on disk under a
key of (hash of the sources it includes, target, options), so a process compiles each variant at
most once and a machine at most once per source change.

Two compilers produce the same cubin: NVRTC (through CuPy's bindings; what runs on the GPU
machine, and works without a GPU) and ``nvcc`` (CI cross-checks with it). Neither needs a CUDA
include path: the sources include nothing but each other (``common.cuh``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass

KERNELS = pathlib.Path(__file__).with_name("kernels")
CACHE_DIR = pathlib.Path(
    os.environ.get("FLASHMLA_CUDA_CACHE", pathlib.Path.home() / ".cache" / "flashmla-cuda")
)
BASE_OPTIONS = ("-std=c++17", "--use_fast_math")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def target_arch(cc: tuple[int, int]) -> str:
    """The ``-arch`` a device of compute capability ``cc`` gets."""
    major, minor = cc
    if cc < (8, 0):
        raise ValueError(f"flashmla-cuda needs compute capability >= 8.0, got {major}.{minor}")
    suffix = "a" if cc in ((9, 0), (10, 0)) else ""
    return f"sm_{major}{minor}{suffix}"


@dataclass(frozen=True)
class Build:
    """One compiled variant: ``source`` (a file in ``kernels/``) with ``defines``."""

    source: str
    defines: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def of(source: str, **defines: int | bool) -> Build:
        return Build(source, tuple(sorted((k, int(v)) for k, v in defines.items())))

    def options(self, arch: str) -> tuple[str, ...]:
        return (
            f"-arch={arch}",
            *BASE_OPTIONS,
            *(f"-D{name}={value}" for name, value in self.defines),
        )

    def key(self, arch: str) -> str:
        """Cache key: the hash of every source file this build includes, the target and the
        options."""
        digest = hashlib.sha256(source_digest(self.source).encode())
        digest.update("\0".join(self.options(arch)).encode())
        return f"{pathlib.Path(self.source).stem}-{arch}-{digest.hexdigest()[:20]}"


def _sources(name: str, seen: dict[str, str] | None = None) -> dict[str, str]:
    """``name`` and every file it includes (transitively), by name."""
    seen = {} if seen is None else seen
    if name not in seen:
        text = seen[name] = (KERNELS / name).read_text()
        for dep in _INCLUDE.findall(text):
            _sources(dep, seen)
    return seen


def source_digest(name: str) -> str:
    digest = hashlib.sha256()
    for file, text in sorted(_sources(name).items()):
        digest.update(file.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


class CompileError(RuntimeError):
    """A kernel source failed to compile (the compiler's log is the message)."""


def compile_nvrtc(build: Build, arch: str) -> bytes:
    """The cubin of ``build`` for ``arch``, from NVRTC (no GPU needed)."""
    from cupy.cuda import nvrtc

    sources = _sources(build.source)
    headers = [name for name in sources if name != build.source]
    prog = nvrtc.createProgram(
        sources[build.source],
        build.source,
        [sources[h].encode() for h in headers],
        [h.encode() for h in headers],
    )
    try:
        try:
            nvrtc.compileProgram(prog, list(build.options(arch)))
        except nvrtc.NVRTCError as exc:
            raise CompileError(
                f"NVRTC failed on {build.source} {build.options(arch)}:\n{nvrtc.getProgramLog(prog)}"
            ) from exc
        return _get_cubin(prog)
    finally:
        nvrtc.destroyProgram(prog)


def compile_nvcc(build: Build, arch: str) -> tuple[bytes, str]:
    """The cubin of ``build`` for ``arch`` from ``nvcc`` and its ptxas report (``-v``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise CompileError("nvcc is not on PATH")
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "k.cubin"
        opts = [o for o in build.options(arch) if not o.startswith("-arch")]
        cmd = [nvcc, "-cubin", gencode, *opts, "-Xptxas", "-v", "-o", str(out),
               str(KERNELS / build.source)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"nvcc failed on {build.source}:\n{proc.stderr}")
        return out.read_bytes(), proc.stderr


def _get_cubin(prog: int) -> bytes:
    """The program's cubin through NVRTC's C API: CuPy 14's ``getCUBIN`` drops the last byte
    (it treats the binary like a NUL-terminated string), which corrupts the ELF image."""
    import ctypes

    from cupy.cuda import nvrtc

    lib = ctypes.CDLL(f"libnvrtc.so.{nvrtc.getVersion()[0]}")  # the one CuPy already loaded
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise CompileError("nvrtcGetCUBINSize failed")
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        raise CompileError("nvrtcGetCUBIN failed")
    return buf.raw


_MEMORY: dict[str, bytes] = {}
_LOCK = threading.Lock()


def cubin(build: Build, arch: str) -> bytes:
    """The cubin of ``build`` for ``arch``: from memory, else the disk cache, else NVRTC."""
    key = build.key(arch)
    hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
        path = CACHE_DIR / f"{key}.cubin"
        if path.exists():
            data = path.read_bytes()
        else:
            data = compile_nvrtc(build, arch)
            try:
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(path)  # atomic: concurrent processes never read half a file
            except OSError:
                pass  # a read-only home only costs recompiles
        _MEMORY[key] = data
        return data


def precompile(builds: list[Build], arch: str, workers: int | None = None) -> None:
    """Fill the disk cache for ``builds`` in parallel processes (NVRTC holds the GIL)."""
    import concurrent.futures
    import multiprocessing

    todo = [b for b in dict.fromkeys(builds) if not (CACHE_DIR / f"{b.key(arch)}.cubin").exists()]
    if len(todo) <= 1:
        for b in todo:
            cubin(b, arch)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(cubin, todo, [arch] * len(todo)))


# --------------------------------------------------------------------------------------------
# Resource usage (registers, spills, local memory) of a cubin, through cuobjdump


_RESOURCE = re.compile(r"Function (\S+):\s*(.*)")
_FIELD = re.compile(r"(\w+):(\d+)")


def cuobjdump() -> str | None:
    """A ``cuobjdump``: the toolkit's, else the one the triton wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _cuobjdump(data: bytes, *args: str) -> str:
    """``cuobjdump args`` run on a cubin given as bytes; its standard output."""
    tool = cuobjdump()
    if tool is None:
        raise CompileError("no cuobjdump found (install the CUDA toolkit or triton)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(data)
        f.flush()
        return subprocess.run(
            [tool, *args, f.name], capture_output=True, text=True, check=True
        ).stdout


def resource_usage(data: bytes) -> dict[str, dict[str, int]]:
    """Per kernel: ``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}``."""
    lines = _cuobjdump(data, "--dump-resource-usage").splitlines()
    usage = {}
    for i, line in enumerate(lines):
        m = _RESOURCE.search(line)
        if m:
            fields = m.group(2) + (lines[i + 1] if i + 1 < len(lines) else "")
            usage[m.group(1)] = {k: int(v) for k, v in _FIELD.findall(fields)}
    return usage


def sass(data: bytes) -> str:
    return _cuobjdump(data, "-sass")
