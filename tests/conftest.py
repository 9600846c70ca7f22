"""Shared fixtures of the cross-backend parity suite.

Cases are generated from the backends' own declarations: every installed backend is run on
every case it declares support for (its reasons become the skip message otherwise), and its
result is compared with the reference backend's unrounded fp32 result under FlashMLA's
tolerances. On a machine without a GPU the suite runs on CPU tensors: the reference itself, and
any backend that declares "cpu" (Triton in interpreter mode, Numba in the simulator)."""

from __future__ import annotations

import pytest
import torch

from flashmla.registry import REGISTRY

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def backend_names() -> list[str]:
    return sorted(REGISTRY.backends())


@pytest.fixture(params=backend_names())
def backend(request) -> str:
    return request.param


def skip_unless_supported(backend: str, problem) -> None:
    reasons = REGISTRY.get(backend).reasons(problem.facts)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
