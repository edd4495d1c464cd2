"""What a source is: it lists its datasets (cheap, in the main process), then indexes each one (in workers).

``discover()`` returns :class:`Discovery`, datasets sorted by ``domain/dataset`` (that order is the corpus order);
``index(spec, folder, guard)`` validates one dataset and writes its index (see ``data_prep.index``) into ``folder``,
leaving out the series the :class:`~data_prep.leakage.LeakageGuard` excludes, and raising
:class:`~data_prep.errors.PrepError` for bad input. ``describe()`` is what the manifest records as the
source and its options. Sources are frozen dataclasses so that worker processes receive them pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data_prep.errors import PrepError
from data_prep.index import IndexedDataset
from data_prep.leakage import LeakageGuard

# The nine domains of Time-300B; CLI sources that take a --domain choose from these.
DOMAINS = ("energy", "finance", "healthcare", "nature", "other", "sales", "synthetic", "transport", "web")


@dataclass(frozen=True)
class DatasetSpec:
    domain: str
    dataset: str
    kind: str  # which reader of the source handles it
    files: tuple[str, ...]  # the inputs it is read from: fingerprinted for resuming, named in skip reports
    freq: str | None = None

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.dataset}"


@dataclass(frozen=True)
class Discovery:
    datasets: list[DatasetSpec]
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}


class Source(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def discover(self) -> Discovery: ...

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset: ...


def to_float_array(values: Any, file: str | Path, field: str) -> np.ndarray:
    """A list of JSON numbers as float64; ``null`` is a missing point (NaN), anything else non-numeric is an error."""
    if not isinstance(values, list):
        raise PrepError(file, field, values, "expected a list of numbers")
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        array = np.asarray([None])
    if array.dtype.kind in "fiu" and array.ndim == 1:
        return array.astype(np.float64)
    # Rare path (missing points or bad input): look at each value to name the first offender.
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
        elif type(v) in (int, float):
            out[i] = v
        else:
            raise PrepError(file, f"{field}[{i}]", v, "not a number")
    return out


def check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}; got {domain!r}")
    return domain
