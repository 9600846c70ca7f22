"""``flashmla bench``: the benchmark shapes of ``spec/performance.md`` on every backend."""

from .runner import Result, run, time_us
from .shapes import SHAPES, Shape, cpu_shapes

__all__ = ["SHAPES", "Result", "Shape", "cpu_shapes", "run", "time_us"]
