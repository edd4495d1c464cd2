"""The one exception prep raises for bad input.

Every message names the file, the offending field and its value, so that a user facing a terabyte of input knows
exactly where to look. ``--on-error skip`` catches this class, and only this class: anything else is a bug or an
I/O failure and must stop the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_MAX_VALUE_CHARS = 80


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


class PrepError(Exception):
    """Bad input: ``file``, ``field`` and ``value`` say where; ``problem`` says what is wrong."""

    def __init__(self, file: str | Path, field: str, value: Any, problem: str) -> None:
        self.file = str(file)
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{self.file}: {field} = {_short(value)}: {problem}")

    # Worker processes send errors back pickled; the default pickling would call __init__ with the message only.
    def __reduce__(self):
        return (type(self), (self.file, self.field, self.value, self.problem))

    def as_record(self) -> dict[str, Any]:
        """A JSON-able description for the manifest's list of skipped datasets."""
        return {"file": self.file, "field": self.field, "value": _short(self.value), "problem": self.problem}
