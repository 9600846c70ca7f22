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
from .registry import REGISTRY
from .scheduler import SchedMeta, Schedule


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
    impl = backend.module()
    planner = getattr(impl, f"plan_{op}", None)
    plan: Any = None
    if isinstance(meta, SchedMeta):
        config = decode_config(p, causal, is_fp8_kvcache)
        if not meta.have_initialized:
            meta.config = config
            meta.have_initialized = True
        elif meta.config != config:
            raise SchedMetaMismatchError(
                "tile_scheduler_metadata",
                "a SchedMeta is bound to the config of its first call; use a new "
                f"get_mla_metadata() for this one (first: {meta.config})",
                config,
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
    return getattr(impl, op)(p, plan)


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
