"""Test and lint sessions. A bare ``nox`` runs what CI runs (every session not tagged "gpu").

uv makes the session environments fast; it does not read pip's configuration, so the machine's
find-links (where its CPU build of torch lives) are handed to it explicitly.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = os.environ.get("FLASHMLA_TORCH", "torch==2.13.0")  # the CPU build on CI machines
CORE = ("-e", "packages/flashmla-core", "-e", "packages/flashmla-ref")
TEST_DEPS = ("pytest>=8", "hypothesis>=6.100", "numpy")
CORE_TESTS = ("packages/flashmla-core/tests", "packages/flashmla-ref/tests")


def _install(session: nox.Session, *packages: str) -> None:
    find_links = os.environ.get("PIP_FIND_LINKS")
    env = {"UV_FIND_LINKS": find_links} if find_links else {}
    session.install(TORCH, *TEST_DEPS, *CORE, *packages, env=env)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


TRITON = (
    "triton==3.6.0",
    "numpy<2.4",
)  # the GPU machine's Triton; its interpreter needs numpy < 2.4


@nox.session(name="test-ref", python=PYTHON)
def test_ref(session: nox.Session) -> None:
    """Core (API, formats, scheduler, registry) and the reference backend against the oracle;
    then the CPU benchmark smoke run (the README's first command, scaled down)."""
    _install(session)
    session.run("pytest", *CORE_TESTS, "tests", *session.posargs)
    session.run("flashmla", "info")
    session.run("flashmla", "bench")


@nox.session(name="test-triton", python=PYTHON)
def test_triton(session: nox.Session) -> None:
    """The Triton backend on CPU: every kernel against the reference in Triton's interpreter
    (the cross-backend parity suite plus the backend's own tests), then ahead-of-time
    compilation of the benchmark configurations for sm_80, sm_90 and sm_100 (registers, spills,
    HGMMA)."""
    _install(session, *TRITON, "-e", "packages/flashmla-triton")
    interpret = {
        "TRITON_INTERPRET": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }  # BLAS threads thrash on 2 cores
    session.run(
        "pytest",
        "tests",
        "packages/flashmla-triton/tests",
        "-k",
        "triton or not parity",
        env=interpret,
    )
    session.run(
        "pytest",
        "packages/flashmla-triton/tests",
        "-k",
        "compile",
        "-s",
        env={"TRITON_INTERPRET": "0"},
    )


CUDA = (
    "cupy-cuda12x>=13",  # imports without a GPU; its NVRTC bindings compile without one
    "nvidia-cuda-nvrtc-cu12",  # the NVRTC library CuPy loads (CI machines have no libnvrtc)
    "triton==3.6.0",  # for the cuobjdump its wheel ships (resource usage, SASS)
)


@nox.session(name="test-cuda", python=PYTHON)
def test_cuda(session: nox.Session) -> None:
    """The CUDA backend on CPU: every kernel source variant compiled for sm_80, sm_90a and
    sm_100a with NVRTC and nvcc (spills and local memory fail the decode kernels), the sm_90a
    feature macro, and the host-side logic. GPU parity tests skip here with a reason."""
    _install(session, *CUDA, "-e", "packages/flashmla-cuda")
    session.run("pytest", "packages/flashmla-cuda/tests")
    session.run("pytest", "tests", "-k", "cuda", "-q")  # skipped without a GPU, with reasons


NUMBA = (
    "numba-cuda>=0.30",
    "numba>=0.61",
    "numpy<2.4",
    "nvidia-cuda-nvrtc-cu12",  # numba-cuda links through NVRTC; CI machines have no libnvrtc
)


@nox.session(name="test-numba", python=PYTHON)
def test_numba(session: nox.Session) -> None:
    """The Numba backend on CPU: the parity suite and the backend's tests in Numba's CUDA
    simulator, then compilation of every kernel variant for sm_90 (no GPU; needs the CUDA
    toolkit's NVVM, skips without it)."""
    _install(session, *NUMBA, "-e", "packages/flashmla-numba")
    sim = {"NUMBA_ENABLE_CUDASIM": "1", "OPENBLAS_NUM_THREADS": "1"}
    session.run(
        "pytest", "tests", "packages/flashmla-numba/tests", "-k", "numba or not parity", env=sim
    )
    session.run(
        "pytest", "packages/flashmla-numba/tests/test_compile.py", env={"NUMBA_ENABLE_CUDASIM": "0"}
    )
