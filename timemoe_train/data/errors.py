"""The loader's one exception for bad input: the message names the file, the field and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataError(ValueError):
    def __init__(self, file: str | Path, field: str, value: Any, problem: str) -> None:
        self.file, self.field, self.value, self.problem = str(file), field, value, problem
        text = repr(value)
        super().__init__(f"{file}: {field} = {text if len(text) <= 80 else text[:77] + '...'}: {problem}")

    def __reduce__(self):  # raised inside DataLoader workers, re-raised in the trainer
        return (type(self), (self.file, self.field, self.value, self.problem))
