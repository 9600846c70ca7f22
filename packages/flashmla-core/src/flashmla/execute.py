"""Run a validated problem on the backend the registry picks (the eager path of every op)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import SchedMetaMismatchError
from .problems import (
    CacheWriteProblem,
    DenseDecodeProblem,
    MhaProblem,
    SparseDecodeProblem,
    SparsePrefillProblem,
    decode_config,
)
from .registry import REGISTRY, Backend
from .scheduler import DecodeConfig, SchedMeta, Schedule


def run_decode(
    p: DenseDecodeProblem | SparseDecodeProblem,
    meta: object,
    causal: bool,
    is_fp8_kvcache: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense or sparse decode. ``meta`` is a lazy :class:`SchedMeta`, or anything else (the
    old-style tensors already live in ``p.schedule``)."""
    op = p.facts.op
    backend = REGISTRY.select(p.facts)
    run, planner = _functions(backend, op)
    plan: Any = None
    if isinstance(meta, SchedMeta):
        config = decode_config(p, causal, is_fp8_kvcache)
        if not meta.have_initialized:
            meta.config = DecodeConfig(*config)
            meta.have_initialized = True
        elif meta.config_key != config:
            raise SchedMetaMismatchError(
                "tile_scheduler_metadata",
                "a SchedMeta is bound to the config of its first call; use a new "
                f"get_mla_metadata() for this one (first: {meta.config})",
                DecodeConfig(*config),
            )
        if planner is not None:
            plan = meta.plans.get(backend.name)
            if plan is None:
                plan = meta.plans[backend.name] = planner(p)
                schedule = getattr(plan, "schedule", plan)  # a Schedule, or a plan holding one
                if isinstance(schedule, Schedule):
                    meta.tile_scheduler_metadata, meta.num_splits = schedule
    elif planner is not None:
        plan = planner(p)
    return run(p, plan)


def _functions(backend: Backend, op: str) -> tuple[Any, Any]:
    """The backend's ``op`` and ``plan_<op>`` functions (looked up once per backend object)."""
    found = backend.functions.get(op)
    if found is None:
        impl = backend.module()
        found = backend.functions[op] = (getattr(impl, op), getattr(impl, f"plan_{op}", None))
    return found


def run_sparse_prefill(p: SparsePrefillProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return REGISTRY.select(p.facts).module().sparse_prefill(p)


def run_mha_forward(p: MhaProblem) -> tuple[torch.Tensor, torch.Tensor]:
    return REGISTRY.select(p.facts).module().mha_forward(p)


def run_mha_backward(
    p: MhaProblem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return REGISTRY.select(p.facts).module().mha_backward(p, out, lse, dout, dlse)


def run_cache_write(p: CacheWriteProblem) -> None:
    REGISTRY.select(p.facts).module().cache_write(p)
