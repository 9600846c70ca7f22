"""Backends: what each declares it supports, how they are found, and how one is picked.

A backend is a distribution that registers an entry point in the group ``flashmla.backends``.
The entry point names an import-light factory returning a :class:`BackendSpec`: pure data
(which ops, devices, compute capabilities, dtypes, head dims, page sizes, cache formats,
features) plus the dotted path of the module that implements the ops. That module is imported
on first use; an import failure becomes a reason, never a crash of ``import flashmla``.

Dispatch: a forced backend (``use_backend`` context > ``set_backend`` > env ``FLASHMLA_BACKEND``)
runs the call or raises :class:`NoBackendError` with its reasons; it never falls back. Otherwise
the highest-priority backend with no reasons runs it. Decisions are cached per :class:`Facts`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.metadata
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .errors import NoBackendError, UnknownBackendError
from .formats import CacheFormat
from .problems import Facts

ENTRY_POINT_GROUP = "flashmla.backends"
ENV_BACKEND = "FLASHMLA_BACKEND"

OPS = (
    "dense_decode",
    "sparse_decode",
    "sparse_prefill",
    "mha_forward",
    "mha_backward",
    "cache_write",
)

# Architecture-specific targets: the exact compute capabilities whose "a" variant a kernel needs.
ARCH_TARGETS: Mapping[str, tuple[int, int]] = {"sm_90a": (9, 0), "sm_100a": (10, 0)}


@dataclass(frozen=True)
class PageSizes:
    """Accepted page block sizes: ``lo <= B <= hi`` and ``B % multiple_of == 0``."""

    lo: int = 1
    hi: int = 1024
    multiple_of: int = 1

    def __str__(self) -> str:
        text = f"{self.lo}..{self.hi}"
        return text if self.multiple_of == 1 else f"{text}, multiple of {self.multiple_of}"

    def __contains__(self, page: int) -> bool:
        return self.lo <= page <= self.hi and page % self.multiple_of == 0


ANY_PAGE = PageSizes()


@dataclass(frozen=True)
class OpSupport:
    """What one backend supports for one op. ``None`` means "any" for a field."""

    devices: frozenset[str] = frozenset({"cuda"})
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None
    arch: str | None = None  # "sm_90a" / "sm_100a": needs exactly that GPU generation
    dtypes: frozenset[torch.dtype] = frozenset({torch.bfloat16})
    cache_formats: frozenset[CacheFormat] | None = None
    head_dims: frozenset[tuple[int, int]] | None = None
    page_sizes: PageSizes = ANY_PAGE
    h_q: frozenset[int] | None = None
    features: frozenset[str] = frozenset()
    check: Callable[[Facts], Iterable[str]] | None = None  # extra hand-written rules
    capturable: bool = True  # safe inside CUDA-graph capture (no host synchronisation)
    priority: int | None = None  # overrides the backend's priority for this op

    def device_reasons(self, device: torch.device) -> list[str]:
        """Reasons that depend on the device alone (shown by ``python -m flashmla info``)."""
        if device.type not in self.devices:
            return [f"runs on {'/'.join(sorted(self.devices))}, not {device.type}"]
        if device.type != "cuda":
            return []
        cc = capability(device)
        need = self.arch and ARCH_TARGETS[self.arch]
        if need and cc != need:
            return [
                f"needs {self.arch} (compute capability {need[0]}.{need[1]}), device is {cc[0]}.{cc[1]}"
            ]
        if self.min_cc and cc < self.min_cc:
            return [
                f"needs compute capability >= {self.min_cc[0]}.{self.min_cc[1]}, device is {cc[0]}.{cc[1]}"
            ]
        if self.max_cc and cc > self.max_cc:
            return [
                f"needs compute capability <= {self.max_cc[0]}.{self.max_cc[1]}, device is {cc[0]}.{cc[1]}"
            ]
        return []

    def reasons(self, facts: Facts) -> list[str]:
        out = self.device_reasons(facts.device)
        if facts.dtype not in self.dtypes:
            out.append(f"dtype {_dtype_name(facts.dtype)} not in {_names(self.dtypes)}")
        if (
            self.cache_formats is not None
            and facts.cache_format is not None
            and facts.cache_format not in self.cache_formats
        ):
            out.append(f"cache format {facts.cache_format} not in {_names(self.cache_formats)}")
        if self.head_dims is not None and facts.head_dims not in self.head_dims:
            out.append(f"head dims (d_qk, d_v) = {facts.head_dims} not in {sorted(self.head_dims)}")
        if facts.page_size is not None and facts.page_size not in self.page_sizes:
            out.append(f"page block size {facts.page_size} not in {self.page_sizes}")
        if self.h_q is not None and facts.h_q not in self.h_q:
            out.append(f"h_q = {facts.h_q} not in {sorted(self.h_q)}")
        missing = facts.features - self.features
        if missing:
            out.append(f"does not support {', '.join(sorted(missing))}")
        if self.check is not None:
            out.extend(self.check(facts))
        return out


@dataclass(frozen=True)
class BackendSpec:
    """A backend's declaration. ``implementation`` is a module path exposing one function per op
    (``dense_decode``, ``sparse_decode``, ...; optionally ``plan_dense_decode`` /
    ``plan_sparse_decode`` returning a schedule cached in the caller's SchedMeta)."""

    name: str
    version: str
    implementation: str
    ops: Mapping[str, OpSupport]
    priority: int = 0
    requires: tuple[str, ...] = ()  # top-level modules the implementation imports
    description: str = ""


@dataclass
class Backend:
    """A registered backend: its spec and, once loaded, its implementation module."""

    spec: BackendSpec
    source: str = "entry point"
    _module: ModuleType | None = None
    _error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    functions: dict[str, tuple] = field(default_factory=dict, repr=False)  # op -> (run, plan)

    @property
    def name(self) -> str:
        return self.spec.name

    def priority(self, op: str) -> int:
        support = self.spec.ops.get(op)
        if support is not None and support.priority is not None:
            return support.priority
        return self.spec.priority

    def unavailable_reason(self) -> str | None:
        """Why the implementation cannot load (a missing dependency or an import error)."""
        if self._error is not None:
            return self._error
        for mod in self.spec.requires:
            if importlib.util.find_spec(mod) is None:
                return f"needs the Python package '{mod}', which is not installed"
        return None

    def module(self) -> ModuleType:
        if self._module is None:
            with self._lock:
                if self._module is None:
                    reason = self.unavailable_reason()
                    if reason is not None:
                        raise NoBackendError(f"backend '{self.name}' is unavailable: {reason}")
                    try:
                        self._module = importlib.import_module(self.spec.implementation)
                    except Exception as exc:
                        self._error = f"import of {self.spec.implementation} failed: {exc!r}"
                        raise NoBackendError(
                            f"backend '{self.name}' is unavailable: {self._error}"
                        ) from exc
        return self._module

    def reasons(self, facts: Facts) -> list[str]:
        support = self.spec.ops.get(facts.op)
        if support is None:
            return [f"does not implement {facts.op}"]
        unavailable = self.unavailable_reason()
        if unavailable is not None:
            return [unavailable]
        return support.reasons(facts)


# --------------------------------------------------------------------------------------------
# Device facts


_CAPABILITY: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cc = _CAPABILITY.get(index)
    if cc is None:
        cc = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cc


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    cc = capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, sm_{cc[0]}{cc[1]})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(items: Iterable[object]) -> str:
    return (
        "{"
        + ", ".join(sorted(_dtype_name(i) if isinstance(i, torch.dtype) else str(i) for i in items))
        + "}"
    )


# --------------------------------------------------------------------------------------------
# The registry


class Registry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] | None = None
        self._lock = threading.RLock()
        self._dispatch: dict[tuple[Facts, str | None], Backend] = {}
        self.load_errors: list[str] = []

    def backends(self) -> dict[str, Backend]:
        if self._backends is None:
            with self._lock:
                if self._backends is None:
                    self._backends = self._discover()
        return self._backends

    def _discover(self) -> dict[str, Backend]:
        found: dict[str, Backend] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                spec = ep.load()()
                if not isinstance(spec, BackendSpec):
                    raise TypeError(f"returned {type(spec).__name__}, not BackendSpec")
            except Exception as exc:
                self.load_errors.append(f"entry point {ep.name} = {ep.value}: {exc!r}")
                continue
            if spec.name in found:
                warnings.warn(
                    f"flashmla: two installed packages register backend '{spec.name}'; "
                    f"keeping {found[spec.name].spec.implementation}, ignoring {spec.implementation}",
                    stacklevel=2,
                )
                continue
            found[spec.name] = Backend(spec, source=f"entry point {ep.value}")
        return found

    def register(self, spec: BackendSpec, *, replace: bool = False) -> Backend:
        """Add a backend without an entry point (tests, development)."""
        with self._lock:
            backends = self.backends()
            if spec.name in backends and not replace:
                raise UnknownBackendError(f"backend '{spec.name}' is already registered")
            backend = backends[spec.name] = Backend(spec, source="register_backend()")
            self._dispatch.clear()
            return backend

    def unregister(self, name: str) -> None:
        with self._lock:
            self.backends().pop(name, None)
            self._dispatch.clear()

    def reload(self) -> None:
        """Forget everything and re-read entry points (after installing a backend)."""
        with self._lock:
            self._backends = None
            self._dispatch.clear()
            self.load_errors.clear()

    def get(self, name: str) -> Backend:
        backends = self.backends()
        backend = backends.get(name)
        if backend is None:
            known = ", ".join(sorted(backends)) or "none"
            raise UnknownBackendError(
                f"no flashmla backend named '{name}' is installed (installed: {known})"
            )
        return backend

    def select(self, facts: Facts) -> Backend:
        forced = forced_backend()
        key = (facts, forced)
        backend = self._dispatch.get(key)
        if backend is None:
            backend = self._select_uncached(facts, forced)
            self._dispatch[key] = backend
        return backend

    def _select_uncached(self, facts: Facts, forced: str | None) -> Backend:
        if forced is not None:
            backend = self.get(forced)
            reasons = backend.reasons(facts) or _load_reasons(backend)
            if reasons:
                raise NoBackendError(
                    _no_backend_text(
                        facts, f"forced backend '{forced}' cannot run", {forced: reasons}
                    )
                )
            return backend
        ranked = sorted(self.backends().values(), key=lambda b: -b.priority(facts.op))
        all_reasons = {}
        for backend in ranked:
            # Importing the chosen implementation here makes an import failure a reason to try
            # the next backend instead of an error on every call.
            reasons = backend.reasons(facts) or _load_reasons(backend)
            if not reasons:
                return backend
            all_reasons[backend.name] = reasons
        raise NoBackendError(_no_backend_text(facts, "no flashmla backend can run", all_reasons))


def _load_reasons(backend: Backend) -> list[str]:
    """Import ``backend``'s implementation now; ``[]`` if it loads, else why it cannot."""
    try:
        backend.module()
    except NoBackendError:
        return [backend.unavailable_reason() or "its implementation failed to load"]
    return []


def _no_backend_text(facts: Facts, head: str, reasons: Mapping[str, list[str]]) -> str:
    lines = [f"{head} {facts.op} with these inputs:", f"  {describe_facts(facts)}"]
    for name, rs in reasons.items():
        lines.append(f"  '{name}' cannot because:")
        lines.extend(f"    - {r}" for r in rs)
    if not reasons:
        lines.append("  (no backend is installed)")
    return "\n".join(lines)


def describe_facts(facts: Facts) -> str:
    parts = [f"device={describe_device(facts.device)}", f"dtype={_dtype_name(facts.dtype)}"]
    if facts.cache_format is not None:
        parts.append(f"cache={facts.cache_format}")
    parts.append(f"head_dims={facts.head_dims}")
    parts.append(f"h_q={facts.h_q} h_kv={facts.h_kv}")
    if facts.s_q:
        parts.append(f"s_q={facts.s_q}")
    if facts.page_size is not None:
        parts.append(f"page_size={facts.page_size}")
    if facts.topk is not None:
        parts.append(f"topk={facts.topk}")
    parts.append(f"features={sorted(facts.features)}")
    return ", ".join(parts)


REGISTRY = Registry()

# --------------------------------------------------------------------------------------------
# Choosing a backend


_UNSET = "<unset>"
_FORCED_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flashmla_backend", default=_UNSET
)
_FORCED_GLOBAL: str | None = None


def forced_backend() -> str | None:
    """The backend name every call must use right now, or None for automatic choice."""
    scoped = _FORCED_SCOPE.get()
    if scoped is not _UNSET:
        return scoped
    return _FORCED_GLOBAL or os.environ.get(ENV_BACKEND) or None


def set_backend(name: str | None) -> None:
    """Force every later call to use backend ``name`` (``None``: choose automatically again)."""
    global _FORCED_GLOBAL
    if name is not None:
        REGISTRY.get(name)
    _FORCED_GLOBAL = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` inside the ``with`` block (``None``: automatic), then restore."""
    if name is not None:
        REGISTRY.get(name)
    token = _FORCED_SCOPE.set(name)
    try:
        yield
    finally:
        _FORCED_SCOPE.reset(token)


def available_backends() -> list[str]:
    """Installed backends whose implementation can load, highest priority first."""
    backends = sorted(REGISTRY.backends().values(), key=lambda b: -b.spec.priority)
    return [b.name for b in backends if b.unavailable_reason() is None]


def register_backend(spec: BackendSpec, *, replace: bool = False) -> None:
    REGISTRY.register(spec, replace=replace)
