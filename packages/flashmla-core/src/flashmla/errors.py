"""The exceptions flashmla raises.

Every bad argument raises an :class:`InvalidArgumentError` subclass that names the argument and
the rule it broke, so callers can catch one type and read ``err.argument`` / ``err.rule``. The
subclasses also derive from the builtin a Python user would expect (``TypeError`` for a dtype,
``AssertionError`` where FlashMLA itself asserts), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

from typing import Any


class FlashMLAError(Exception):
    """Base class of every error raised by flashmla."""


class InvalidArgumentError(FlashMLAError, ValueError):
    """An argument broke a documented rule. ``argument`` names it, ``rule`` says what is required."""

    def __init__(self, argument: str, rule: str, got: Any = None) -> None:
        self.argument = argument
        self.rule = rule
        self.got = got
        text = f"{argument}: {rule}"
        if got is not None:
            text += f" (got {got})"
        super().__init__(text)


class DTypeError(InvalidArgumentError, TypeError):
    """A tensor has the wrong dtype."""


class ShapeError(InvalidArgumentError):
    """A tensor has the wrong rank or shape, or sizes of several arguments disagree."""


class DeviceError(InvalidArgumentError):
    """A tensor lives on the wrong device, or arguments live on different devices."""


class LayoutError(InvalidArgumentError):
    """A tensor's strides break a layout rule (for example, the last dimension must be contiguous)."""


class SchedMetaMismatchError(InvalidArgumentError, AssertionError):
    """A lazily initialised :class:`~flashmla.SchedMeta` was reused for a call with another config."""


class UnknownBackendError(FlashMLAError, ValueError):
    """A backend name that no installed package registers."""


class NoBackendError(FlashMLAError, NotImplementedError):
    """No backend can run this call (or the forced one cannot); the message lists every reason."""
