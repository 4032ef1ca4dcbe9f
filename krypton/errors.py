"""The two kinds of failure the engine reports, so that a server can map them without reading messages.

- `OptionError` (a ValueError): a caller's argument is wrong. It carries the parameter, the value and
  the allowed range; a server answers it with HTTP 400.
- `ModelError` (a RuntimeError): the model cannot be explained as given (training mode, several
  inputs, an output that is not one logits row, an input shape it rejects). Not the request's fault.
"""
from __future__ import annotations

from typing import Any

ECHO_LIMIT = 64  # characters of a caller's value repeated in a message


def short(value: Any, limit: int = ECHO_LIMIT) -> str:
    """repr(value), cut to `limit` characters: messages never echo unbounded input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


class OptionError(ValueError):
    """A wrong argument: `.parameter`, `.value` and `.allowed` (the allowed range, as text)."""

    def __init__(self, parameter: str, value: Any, allowed: str, problem: str = "is out of range",
                 shown: str | None = None):
        self.parameter, self.value, self.allowed = parameter, value, allowed
        super().__init__(f"{parameter}={short(value) if shown is None else shown} {problem}: allowed {allowed}")


class ModelError(RuntimeError):
    """The model cannot be explained as given; see the module docstring."""
