"""Run one benchmark shape once on one backend (for ncu / compute-sanitizer):
python benchmarks/profile_one.py D1 cuda"""

from __future__ import annotations

import sys

import torch

import flashmla
from flashmla.bench import runner
from flashmla.bench.shapes import SHAPES


def main() -> None:
    shape_id, backend = sys.argv[1], sys.argv[2]
    shape = next(s for s in SHAPES if s.id == shape_id)
    call = runner._call(shape, shape.inputs(torch.device("cuda")))
    with flashmla.use_backend(backend):
        for _ in range(2):
            call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
