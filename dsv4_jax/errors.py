"""Exceptions that mean "the input is wrong", as opposed to a bug: the CLIs print these as one paragraph.

``CheckpointError`` (a checkpoint file or tensor at fault) lives in ``dsv4_jax.convert.safetensors_io`` and
``ConversionError`` in ``dsv4_jax.convert.writer``; the classes here cover generation.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A bad argument or input file (the message names the argument, file or line at fault)."""


class NonFiniteError(RuntimeError):
    """The model produced non-finite logits: ``rows`` (batch rows) at generation ``step`` (0 = first new token)."""

    def __init__(self, message: str, rows: tuple[int, ...] = (), step: int | None = None):
        super().__init__(message)
        self.rows = tuple(rows)
        self.step = step
