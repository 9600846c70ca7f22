"""Backend discovery (real entry points), forced and automatic dispatch, and support rules."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import flashmla
from flashmla import registry, testing
from flashmla.errors import NoBackendError, UnknownBackendError
from flashmla.formats import CacheFormat
from flashmla.problems import Facts
from flashmla.registry import REGISTRY, BackendSpec, OpSupport, PageSizes

MARK = 7.0  # what the fake backends' outputs are filled with


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with the installed backends, automatic choice, no env var."""
    monkeypatch.delenv(registry.ENV_BACKEND, raising=False)
    flashmla.set_backend(None)
    REGISTRY.reload()
    yield
    flashmla.set_backend(None)
    REGISTRY.reload()


def prefill_inputs(h_q: int = 2) -> dict:
    return testing.sparse_prefill_inputs(3, 16, h_q, 8)


def is_marked(out: torch.Tensor, mark: float = MARK) -> bool:
    return bool((out.float() == mark).all())


def keep_only(*names: str) -> None:
    """Unregister every installed backend but ``names`` (other packages may be installed)."""
    for name in list(REGISTRY.backends()):
        if name not in names:
            REGISTRY.unregister(name)


def installed() -> str:
    return ", ".join(sorted(REGISTRY.backends()))


# --------------------------------------------------------------------------------------------
# Fake implementations installed without an entry point (register_backend + sys.modules)


def _fake_impl_module(name: str, mark: float = MARK) -> types.ModuleType:
    mod = types.ModuleType(name)

    def sparse_prefill(p):
        out, max_logits, lse = p.empty_outputs()
        return out.fill_(mark), max_logits.fill_(mark), lse.fill_(mark)

    mod.sparse_prefill = sparse_prefill
    mod.calls = 0
    return mod


def install(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    *,
    priority: int = 100,
    mark: float = MARK,
    support: OpSupport | None = None,
    implementation: str | None = None,
    requires: tuple[str, ...] = (),
    op: str = "sparse_prefill",
) -> None:
    """Register backend ``name`` running ``op`` (on CPU by default); sparse_prefill's outputs
    are filled with ``mark``."""
    module = f"_flashmla_test_impl_{name}"
    if implementation is None:
        monkeypatch.setitem(sys.modules, module, _fake_impl_module(module, mark))
    support = support or OpSupport(
        devices=frozenset({"cpu"}), features=frozenset({"attn_sink", "topk_length"})
    )
    spec = BackendSpec(
        name=name,
        version="0",
        implementation=implementation or module,
        ops={op: support},
        priority=priority,
        requires=requires,
    )
    flashmla.register_backend(spec)


# --------------------------------------------------------------------------------------------
# (1) A real entry point


FAKEPKG = """
import torch
import flashmla


def spec():
    return flashmla.BackendSpec(
        name="fake",
        version="0.0.0",
        implementation="fakepkg.impl",
        priority={priority},
        ops={{"sparse_prefill": flashmla.OpSupport(devices=frozenset({{"cpu"}}))}},
        description="test backend installed through an entry point",
    )


def broken_spec():
    raise RuntimeError("this spec factory is broken")


def not_a_spec():
    return "not a BackendSpec"


def missing_impl_spec():
    return flashmla.BackendSpec(
        name="missing_impl",
        version="0",
        implementation="fakepkg.does_not_exist",
        priority=1000,
        ops={{"sparse_prefill": flashmla.OpSupport(devices=frozenset({{"cpu"}}))}},
    )


def missing_requires_spec():
    return flashmla.BackendSpec(
        name="missing_requires",
        version="0",
        implementation="fakepkg.impl",
        priority=1000,
        requires=("flashmla_test_not_installed_pkg",),
        ops={{"sparse_prefill": flashmla.OpSupport(devices=frozenset({{"cpu"}}))}},
    )
"""

FAKEPKG_IMPL = f"""
def sparse_prefill(p):
    out, max_logits, lse = p.empty_outputs()
    return out.fill_({MARK}), max_logits.fill_({MARK}), lse.fill_({MARK})
"""


def write_distribution(root: Path, entry_points: dict[str, str], priority: int = 50) -> Path:
    """A directory that, on sys.path, holds package ``fakepkg`` and an installed distribution
    ``fake-backend`` declaring ``entry_points`` in the ``flashmla.backends`` group."""
    pkg = root / "fakepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKEPKG.format(priority=priority))
    (pkg / "impl.py").write_text(FAKEPKG_IMPL)
    info = root / "fake_backend-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-backend\nVersion: 0.0.0\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n"
    )
    return root


@contextlib.contextmanager
def on_sys_path(root: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        importlib.invalidate_caches()
        REGISTRY.reload()
        try:
            yield
        finally:
            for mod in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
                del sys.modules[mod]
    importlib.invalidate_caches()
    REGISTRY.reload()


def test_entry_point_backend_is_discovered_and_chosen(tmp_path: Path) -> None:
    root = write_distribution(tmp_path, {"fake": "fakepkg:spec"}, priority=10**6)
    inputs = prefill_inputs()
    assert not is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
    with on_sys_path(root):
        backends = REGISTRY.backends()
        assert "fake" in backends
        assert backends["fake"].source == "entry point fakepkg:spec"
        assert "fakepkg.impl" not in sys.modules  # implementations load on first use
        available = flashmla.available_backends()
        assert available[0] == "fake" and "ref" in available
        out, max_logits, lse = flashmla.flash_mla_sparse_fwd(**inputs)
        assert is_marked(out) and is_marked(max_logits) and is_marked(lse)
        assert "fakepkg.impl" in sys.modules
        # ops it does not declare still go to the reference backend
        m = testing.mha_inputs(1, 2, 2, 2, d_qk=16, d_v=16)
        assert REGISTRY.select(_facts_of_mha(m)).name == "ref"
    # restored: the distribution is gone from sys.path and from the registry
    assert "fake" not in flashmla.available_backends()
    assert "ref" in flashmla.available_backends()
    assert not is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])


def test_entry_point_lower_priority_is_not_chosen(tmp_path: Path) -> None:
    root = write_distribution(tmp_path, {"fake": "fakepkg:spec"}, priority=-5)
    with on_sys_path(root):
        available = flashmla.available_backends()
        assert available.index("ref") < available.index("fake")
        assert not is_marked(flashmla.flash_mla_sparse_fwd(**prefill_inputs())[0])
        with flashmla.use_backend("fake"):
            assert is_marked(flashmla.flash_mla_sparse_fwd(**prefill_inputs())[0])


def test_broken_entry_points_become_load_errors_and_reasons(tmp_path: Path) -> None:
    root = write_distribution(
        tmp_path,
        {
            "broken": "fakepkg:broken_spec",
            "notaspec": "fakepkg:not_a_spec",
            "nomodule": "fakepkg_absent:spec",
            "missing_impl": "fakepkg:missing_impl_spec",
            "missing_requires": "fakepkg:missing_requires_spec",
        },
    )
    with on_sys_path(root):
        backends = REGISTRY.backends()
        assert set(backends) >= {"ref", "missing_impl", "missing_requires"}
        errors = "\n".join(REGISTRY.load_errors)
        assert "this spec factory is broken" in errors
        assert "not BackendSpec" in errors
        assert "fakepkg_absent" in errors
        # a missing `requires` module is known without importing anything
        available = flashmla.available_backends()
        assert "missing_requires" not in available
        reason = backends["missing_requires"].unavailable_reason()
        assert reason and "flashmla_test_not_installed_pkg" in reason
        # both high-priority broken backends are skipped; the call still runs on ref
        inputs = prefill_inputs()
        out = flashmla.flash_mla_sparse_fwd(**inputs)[0]
        assert not is_marked(out)
        want = flashmla.flash_mla_sparse_fwd(**inputs)[0]
        assert torch.equal(out, want)
        assert (
            "import of fakepkg.does_not_exist failed"
            in backends["missing_impl"].unavailable_reason()
        )
        assert "missing_impl" not in flashmla.available_backends()
        for name, text in (
            ("missing_impl", "import of fakepkg.does_not_exist failed"),
            ("missing_requires", "needs the Python package 'flashmla_test_not_installed_pkg'"),
        ):
            with flashmla.use_backend(name), pytest.raises(NoBackendError) as info:
                flashmla.flash_mla_sparse_fwd(**inputs)
            assert f"forced backend '{name}' cannot run sparse_prefill" in str(info.value)
            assert text in str(info.value)


def test_import_flashmla_survives_broken_backends(tmp_path: Path) -> None:
    """A fresh interpreter with broken backends installed imports flashmla and runs a call."""
    root = write_distribution(
        tmp_path,
        {
            "broken": "fakepkg:broken_spec",
            "nomodule": "fakepkg_absent:spec",
            "missing_impl": "fakepkg:missing_impl_spec",
            "missing_requires": "fakepkg:missing_requires_spec",
        },
    )
    script = textwrap.dedent(
        """
        import flashmla
        from flashmla import testing
        from flashmla.registry import REGISTRY
        out = flashmla.flash_mla_sparse_fwd(**testing.sparse_prefill_inputs(2, 8, 2, 4))[0]
        print("available", flashmla.available_backends())
        print("errors", len(REGISTRY.load_errors))
        print("finite", bool(out.float().isfinite().all()))
        """
    )
    env_path = f"{root}:{':'.join(p for p in sys.path if p)}"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    available = done.stdout.split("available ")[1].splitlines()[0]
    assert "'ref'" in available
    assert "missing" not in available and "broken" not in available, available
    assert "errors 2" in done.stdout
    assert "finite True" in done.stdout


def test_duplicate_backend_name_warns_and_keeps_first(tmp_path: Path) -> None:
    root = write_distribution(tmp_path, {"fake": "fakepkg:spec", "fake2": "fakepkg:spec"})
    with on_sys_path(root), pytest.warns(UserWarning, match="register backend 'fake'"):
        assert "fake" in REGISTRY.backends()


# --------------------------------------------------------------------------------------------
# (2) Forced backends never fall back


LIMITED = OpSupport(devices=frozenset({"cpu"}), h_q=frozenset({64}), features=frozenset())


@pytest.mark.parametrize("how", ["set_backend", "use_backend", "env"])
def test_forced_backend_that_cannot_run_raises(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    install(monkeypatch, "limited", priority=-10, support=LIMITED)
    inputs = testing.sparse_prefill_inputs(3, 16, 2, 8, attn_sink=True)
    with contextlib.ExitStack() as stack:
        if how == "set_backend":
            flashmla.set_backend("limited")
        elif how == "use_backend":
            stack.enter_context(flashmla.use_backend("limited"))
        else:
            monkeypatch.setenv(registry.ENV_BACKEND, "limited")
        assert registry.forced_backend() == "limited"
        with pytest.raises(NoBackendError) as info:
            flashmla.flash_mla_sparse_fwd(**inputs)
    text = str(info.value)
    assert "forced backend 'limited' cannot run sparse_prefill with these inputs:" in text
    assert "device=cpu, dtype=bfloat16, head_dims=(576, 512), h_q=2 h_kv=1" in text
    assert "topk=8" in text and "features=['attn_sink']" in text
    assert "'limited' cannot because:" in text
    assert "- h_q = 2 not in [64]" in text
    assert "- does not support attn_sink" in text
    assert "'ref'" not in text  # only the forced backend is considered
    # once no longer forced, the reference backend runs it
    flashmla.set_backend(None)
    monkeypatch.delenv(registry.ENV_BACKEND, raising=False)
    flashmla.flash_mla_sparse_fwd(**inputs)


def test_forced_backend_runs_even_with_lower_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "low", priority=-10)
    inputs = prefill_inputs()
    assert not is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
    monkeypatch.setenv(registry.ENV_BACKEND, "low")
    assert is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])


def test_precedence_scope_over_global_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "a", priority=-1, mark=1.0)
    install(monkeypatch, "b", priority=-2, mark=2.0)
    install(monkeypatch, "c", priority=-3, mark=3.0)
    inputs = prefill_inputs()

    def mark() -> float:
        return flashmla.flash_mla_sparse_fwd(**inputs)[0].flatten()[0].item()

    monkeypatch.setenv(registry.ENV_BACKEND, "c")
    assert mark() == 3.0
    flashmla.set_backend("b")
    assert mark() == 2.0
    with flashmla.use_backend("a"):
        assert mark() == 1.0
        with flashmla.use_backend("c"):
            assert mark() == 3.0
        assert mark() == 1.0
    assert mark() == 2.0
    flashmla.set_backend(None)
    assert mark() == 3.0


# --------------------------------------------------------------------------------------------
# (3) Unknown names


def test_unknown_backend_names() -> None:
    for attempt in (
        lambda: flashmla.set_backend("nope"),
        lambda: flashmla.use_backend("nope").__enter__(),
    ):
        with pytest.raises(UnknownBackendError) as info:
            attempt()
        assert f"no flashmla backend named 'nope' is installed (installed: {installed()})" in str(
            info.value
        )
    assert registry.forced_backend() is None  # the failed calls changed nothing


def test_unknown_backend_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "other", priority=-1)
    monkeypatch.setenv(registry.ENV_BACKEND, "nope")
    with pytest.raises(UnknownBackendError) as info:
        flashmla.flash_mla_sparse_fwd(**prefill_inputs())
    assert "'nope'" in str(info.value)
    assert f"installed: {installed()}" in str(info.value)
    assert "other" in installed() and "ref" in installed()


def test_register_twice_needs_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "twice", mark=1.0)
    with pytest.raises(ValueError, match="already registered"):
        install(monkeypatch, "twice", mark=2.0)
    spec = REGISTRY.get("twice").spec
    monkeypatch.setitem(sys.modules, "_twice2", _fake_impl_module("_twice2", 2.0))
    flashmla.register_backend(
        BackendSpec(spec.name, "1", "_twice2", spec.ops, priority=spec.priority), replace=True
    )
    assert flashmla.flash_mla_sparse_fwd(**prefill_inputs())[0].flatten()[0].item() == 2.0


# --------------------------------------------------------------------------------------------
# (4) Implementations that cannot load


def test_failed_import_is_a_reason_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "broken", priority=100, implementation="_flashmla_test_no_such_module")
    inputs = prefill_inputs()
    for _ in range(2):  # the second call goes through the dispatch cache
        out = flashmla.flash_mla_sparse_fwd(**inputs)[0]
        assert out.float().isfinite().all()
    backend = REGISTRY.get("broken")
    assert "import of _flashmla_test_no_such_module failed" in backend.unavailable_reason()
    assert "ModuleNotFoundError" in backend.unavailable_reason()
    assert "broken" not in flashmla.available_backends()
    with flashmla.use_backend("broken"), pytest.raises(NoBackendError) as info:
        flashmla.flash_mla_sparse_fwd(**inputs)
    assert "import of _flashmla_test_no_such_module failed" in str(info.value)


def test_missing_requirement_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "needy", priority=100, requires=("flashmla_test_absent_dependency",))
    assert "needy" not in flashmla.available_backends()
    inputs = prefill_inputs()
    assert not is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
    flashmla.set_backend("needy")  # known name: allowed; the call explains
    with pytest.raises(NoBackendError) as info:
        flashmla.flash_mla_sparse_fwd(**inputs)
    assert "needs the Python package 'flashmla_test_absent_dependency'" in str(info.value)


def test_import_error_inside_implementation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "_flashmla_test_raising_impl.py").write_text("raise ImportError('no kernels')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install(monkeypatch, "raising", priority=100, implementation="_flashmla_test_raising_impl")
    assert not is_marked(flashmla.flash_mla_sparse_fwd(**prefill_inputs())[0])
    assert "ImportError('no kernels')" in REGISTRY.get("raising").unavailable_reason()


# --------------------------------------------------------------------------------------------
# (5) Nothing fits: every backend's reasons


def test_no_backend_lists_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_only()
    install(monkeypatch, "only64", support=LIMITED)
    install(
        monkeypatch,
        "gpuonly",
        priority=5,
        support=OpSupport(devices=frozenset({"cuda"}), features=frozenset({"attn_sink"})),
    )
    install(monkeypatch, "broken", priority=1, implementation="_flashmla_test_no_such_module")
    inputs = testing.sparse_prefill_inputs(3, 16, 2, 8, topk_length=True)
    with pytest.raises(NoBackendError) as info:
        flashmla.flash_mla_sparse_fwd(**inputs)
    text = str(info.value)
    assert text.startswith("no flashmla backend can run sparse_prefill with these inputs:")
    assert "features=['topk_length']" in text
    for line in (
        "'only64' cannot because:",
        "- h_q = 2 not in [64]",
        "- does not support topk_length",
        "'gpuonly' cannot because:",
        "- runs on cuda, not cpu",
        "'broken' cannot because:",
        "import of _flashmla_test_no_such_module failed",
    ):
        assert line in text, text
    # listed in priority order
    assert text.index("'only64'") < text.index("'gpuonly'") < text.index("'broken'")


def test_no_backend_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_only()
    with pytest.raises(NoBackendError, match=r"\(no backend is installed\)"):
        flashmla.flash_mla_sparse_fwd(**prefill_inputs())


def test_op_not_implemented_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "prefillonly")
    m = testing.mha_inputs(1, 2, 2, 2, d_qk=16, d_v=16)
    with flashmla.use_backend("prefillonly"), pytest.raises(NoBackendError) as info:
        flashmla.flash_attn_varlen_func(**m)
    assert "does not implement mha_forward" in str(info.value)


# --------------------------------------------------------------------------------------------
# (6) and (7) Dispatch caching follows the forced backend


def _facts_of_mha(m: dict) -> Facts:
    from flashmla import problems

    return problems.build_mha(
        m["q"], m["k"], m["v"], m["cu_seqlens_qo"], m["cu_seqlens_kv"], m["max_seqlen_qo"],
        m["max_seqlen_kv"], 0.0, None, False,
    ).facts  # fmt: skip


def test_dispatch_cache_is_not_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "low", priority=-10)
    inputs = prefill_inputs()

    def marked() -> bool:
        return is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])

    assert not marked()
    flashmla.set_backend("low")
    assert marked()
    flashmla.set_backend(None)
    assert not marked()
    with flashmla.use_backend("low"):
        assert marked()
    assert not marked()
    monkeypatch.setenv(registry.ENV_BACKEND, "low")
    assert marked()
    monkeypatch.delenv(registry.ENV_BACKEND)
    assert not marked()
    # a newly registered, better backend takes over at once
    install(monkeypatch, "high", priority=10, mark=3.0)
    assert is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0], 3.0)
    REGISTRY.unregister("high")
    assert not marked()


def test_use_backend_none_inside_set_backend_means_automatic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, "low", priority=-10)
    inputs = prefill_inputs()
    flashmla.set_backend("low")
    assert is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
    with flashmla.use_backend(None):
        assert registry.forced_backend() is None
        assert not is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
        with flashmla.use_backend("low"):
            assert is_marked(flashmla.flash_mla_sparse_fwd(**inputs)[0])
    assert registry.forced_backend() == "low"
    monkeypatch.setenv(registry.ENV_BACKEND, "low")
    flashmla.set_backend(None)
    with flashmla.use_backend(None):
        assert registry.forced_backend() is None  # also overrides the env var


def test_use_backend_restores_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, "low", priority=-10)
    with pytest.raises(RuntimeError), flashmla.use_backend("low"):
        raise RuntimeError
    assert registry.forced_backend() is None


def test_per_op_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    support = OpSupport(devices=frozenset({"cpu"}), priority=10)
    install(monkeypatch, "opfirst", priority=-10, support=support)
    assert is_marked(flashmla.flash_mla_sparse_fwd(**prefill_inputs())[0])


# --------------------------------------------------------------------------------------------
# (8) OpSupport rules


def facts(
    device: str = "cuda:0",
    dtype: torch.dtype = torch.bfloat16,
    cache_format: CacheFormat | None = CacheFormat.FP8_V32,
    head_dims: tuple[int, int] = (576, 512),
    h_q: int = 128,
    page_size: int | None = 64,
    features: frozenset[str] = frozenset(),
) -> Facts:
    return Facts(
        "sparse_decode", torch.device(device), dtype, cache_format, head_dims, h_q, 1, 1,
        page_size, 64, features,
    )  # fmt: skip


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend cuda devices have the compute capability ``gpu.cc`` (no CUDA call is made)."""
    state = types.SimpleNamespace(cc=(9, 0))
    monkeypatch.setattr(registry, "capability", lambda device: state.cc)
    return state


@pytest.mark.parametrize(
    "cc, support, want",
    [
        ((9, 0), OpSupport(), []),
        ((9, 0), OpSupport(arch="sm_90a"), []),
        (
            (10, 0),
            OpSupport(arch="sm_90a"),
            ["needs sm_90a (compute capability 9.0), device is 10.0"],
        ),
        (
            (8, 9),
            OpSupport(arch="sm_90a"),
            ["needs sm_90a (compute capability 9.0), device is 8.9"],
        ),
        ((10, 0), OpSupport(arch="sm_100a"), []),
        (
            (10, 3),
            OpSupport(arch="sm_100a"),
            ["needs sm_100a (compute capability 10.0), device is 10.3"],
        ),
        ((8, 0), OpSupport(min_cc=(8, 0)), []),
        ((7, 5), OpSupport(min_cc=(8, 0)), ["needs compute capability >= 8.0, device is 7.5"]),
        (
            (12, 0),
            OpSupport(min_cc=(8, 0), max_cc=(10, 3)),
            ["needs compute capability <= 10.3, device is 12.0"],
        ),
        ((10, 3), OpSupport(min_cc=(8, 0), max_cc=(10, 3)), []),
        ((9, 0), OpSupport(devices=frozenset({"cpu"})), ["runs on cpu, not cuda"]),
        ((9, 0), OpSupport(devices=frozenset({"cpu", "xpu"})), ["runs on cpu/xpu, not cuda"]),
    ],
    ids=lambda x: repr(x) if isinstance(x, tuple) else None,
)
def test_device_reasons(gpu, cc, support: OpSupport, want: list[str]) -> None:
    gpu.cc = cc
    assert support.reasons(facts()) == want


def test_cpu_device_ignores_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(device):
        raise AssertionError("capability() must not be called for a cpu device")

    monkeypatch.setattr(registry, "capability", no_cuda)
    support = OpSupport(devices=frozenset({"cpu", "cuda"}), arch="sm_90a", min_cc=(9, 0))
    assert support.reasons(facts(device="cpu")) == []


def test_capability_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_CAPABILITY", {3: (8, 6)})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: pytest.fail("not cached"))
    assert registry.capability(torch.device("cuda:3")) == (8, 6)
    assert OpSupport(min_cc=(9, 0)).reasons(facts(device="cuda:3")) == [
        "needs compute capability >= 9.0, device is 8.6"
    ]


@pytest.mark.parametrize(
    "support, f, want",
    [
        (OpSupport(), facts(dtype=torch.float16), "dtype float16 not in {bfloat16}"),
        (
            OpSupport(dtypes=frozenset({torch.float16, torch.bfloat16})),
            facts(dtype=torch.float32),
            "dtype float32 not in {bfloat16, float16}",
        ),
        (
            OpSupport(cache_formats=frozenset({CacheFormat.FP8_V32})),
            facts(cache_format=CacheFormat.FP8_MODEL1),
            "cache format fp8_model1 not in {fp8_v32}",
        ),
        (
            OpSupport(head_dims=frozenset({(576, 512)})),
            facts(head_dims=(512, 512)),
            "head dims (d_qk, d_v) = (512, 512) not in [(576, 512)]",
        ),
        (
            OpSupport(page_sizes=PageSizes(64, 64)),
            facts(page_size=16),
            "page block size 16 not in 64..64",
        ),
        (
            OpSupport(page_sizes=PageSizes(1, 1024, 64)),
            facts(page_size=96),
            "page block size 96 not in 1..1024, multiple of 64",
        ),
        (OpSupport(h_q=frozenset({64, 128})), facts(h_q=16), "h_q = 16 not in [64, 128]"),
        (
            OpSupport(features=frozenset({"mtp"})),
            facts(features=frozenset({"mtp", "topk_length", "attn_sink"})),
            "does not support attn_sink, topk_length",
        ),
        (
            OpSupport(check=lambda f: ["topk must be a multiple of 128"] if f.topk % 128 else []),
            facts(),
            "topk must be a multiple of 128",
        ),
    ],
    ids=[
        "dtype",
        "dtype-set",
        "format",
        "head-dims",
        "page-exact",
        "page-multiple",
        "h_q",
        "features",
        "check",
    ],
)
def test_support_reasons(gpu, support: OpSupport, f: Facts, want: str) -> None:
    assert support.reasons(f) == [want]


@pytest.mark.parametrize(
    "support, f",
    [
        (OpSupport(cache_formats=frozenset({CacheFormat.BF16})), facts(cache_format=None)),
        (OpSupport(page_sizes=PageSizes(64, 64)), facts(page_size=None)),
        (OpSupport(page_sizes=PageSizes(1, 1024, 64)), facts(page_size=128)),
        (OpSupport(h_q=frozenset({64, 128})), facts(h_q=128)),
        (OpSupport(features=frozenset({"mtp"})), facts(features=frozenset({"mtp"}))),
        (OpSupport(head_dims=frozenset({(576, 512), (512, 512)})), facts(head_dims=(512, 512))),
    ],
    ids=["no-format", "no-page", "page-ok", "h_q-ok", "features-ok", "head-dims-ok"],
)
def test_support_accepts(gpu, support: OpSupport, f: Facts) -> None:
    assert support.reasons(f) == []


def test_reasons_accumulate(gpu) -> None:
    gpu.cc = (8, 0)
    support = OpSupport(arch="sm_90a", h_q=frozenset({64}), page_sizes=PageSizes(64, 64))
    got = support.reasons(facts(dtype=torch.float16, h_q=16, page_size=32))
    assert got == [
        "needs sm_90a (compute capability 9.0), device is 8.0",
        "dtype float16 not in {bfloat16}",
        "page block size 32 not in 64..64",
        "h_q = 16 not in [64]",
    ]


@pytest.mark.parametrize(
    "sizes, page, ok",
    [
        (PageSizes(), 0, False),
        (PageSizes(), 1, True),
        (PageSizes(), 1024, True),
        (PageSizes(), 1025, False),
        (PageSizes(64, 64), 64, True),
        (PageSizes(64, 64), 63, False),
        (PageSizes(64, 1024, 64), 128, True),
        (PageSizes(64, 1024, 64), 96, False),
        (PageSizes(64, 1024, 64), 1088, False),
        (PageSizes(2, 100, 2), 0, False),
    ],
    ids=lambda x: str(x) if isinstance(x, PageSizes) else None,
)
def test_page_sizes_contains(sizes: PageSizes, page: int, ok: bool) -> None:
    assert (page in sizes) is ok


def test_select_on_fake_gpu(gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch on a pretend H100: an sm_90a backend beats ref; on a pretend B200 it does not."""
    monkeypatch.setattr(registry, "describe_device", lambda d: f"{d} (fake)")
    keep_only("ref")
    hopper = OpSupport(arch="sm_90a", cache_formats=frozenset(CacheFormat))
    install(monkeypatch, "hopper", support=hopper, op="sparse_decode")
    f = facts()
    assert REGISTRY.select(f).name == "hopper"
    gpu.cc = (10, 0)
    REGISTRY.reload()  # capability is part of the device, not of Facts: a new process in practice
    keep_only("ref")
    install(monkeypatch, "hopper", support=hopper, op="sparse_decode")
    assert REGISTRY.select(f).name == "ref"
    with flashmla.use_backend("hopper"), pytest.raises(NoBackendError) as info:
        REGISTRY.select(f)
    assert "device=cuda:0 (fake)" in str(info.value)
    assert "needs sm_90a (compute capability 9.0), device is 10.0" in str(info.value)
