"""Exceptions that mean "the input is wrong", as opposed to a bug: the CLIs print these as one paragraph.

``CheckpointError`` (a checkpoint file or tensor at fault) lives in ``dsv4_jax.convert.safetensors_io`` and
``ConversionError`` in ``dsv4_jax.convert.writer``; the classes here cover generation.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A bad argument or input file (the message names the argument, file or line at fault)."""


class NonFiniteError(RuntimeError):
    """The model produced non-finite logits: ``rows`` (batch rows) at generation ``step`` (0 = first new token).

    ``step`` is the earliest failing step; ``steps`` maps every failing row to its own step; ``tokens`` holds every
    row's tokens generated before its failure (rows without a failure: complete), or ``None``.
    """

    def __init__(self, message: str, rows: tuple[int, ...] = (), step: int | None = None, *,
                 steps: dict[int, int] | None = None, tokens: list[list[int]] | None = None):
        super().__init__(message)
        self.rows = tuple(rows)
        self.step = step
        self.steps = dict(steps) if steps is not None else ({r: step for r in self.rows} if step is not None else {})
        self.tokens = tokens
