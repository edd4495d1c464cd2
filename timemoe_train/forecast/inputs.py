"""What timemoe-forecast reads of a wide or long CSV, Parquet or Arrow table: every series, through timemoe-prep's
own reader, so a file prep accepts is one forecast accepts, with the same errors (`stream.py` reads corpora and
one-row-per-series tables part by part itself). Each series is cut to its last `context_length` points after its
missing points are dealt with: leading and trailing ones dropped (the forecast continues from the last real
point), interior ones filled linearly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import PrepError
from data_prep.corpus_manifest import MANIFEST_NAME
from data_prep.sources.tabular import SUFFIXES, TableLayout, read_timed_series

from .model import ForecastError


@dataclass
class Context:
    item_id: str
    values: np.ndarray  # float32, finite, at most context_length points
    last_time: pd.Timestamp | None  # of the last point, when the input has datetimes


@dataclass
class Inputs:
    contexts: list[Context]
    freq: str | None
    notes: list[str] = field(default_factory=list)  # said once each, not once per series

    @property
    def timestamps(self) -> bool:
        """Whether forecasts get timestamps (else steps 1..H): datetimes at a known frequency."""
        return self.freq is not None and all(c.last_time is not None for c in self.contexts)


def table_kind(path: Path) -> str | None:
    """csv, parquet or arrow, by the file's suffix; None for any other file."""
    return next((kind for kind, suffixes in SUFFIXES.items() if path.suffix.lower() in suffixes), None)


def not_a_table(path: Path) -> ForecastError:
    return ForecastError(f"{path}: --input must be a .csv, .parquet or .arrow file, a folder of them or a prepared "
                         f"corpus folder (with {MANIFEST_NAME})")


def finite_tail(path: Path, item_id: str, points: np.ndarray, context_length: int) -> tuple[np.ndarray, int, int]:
    """(the last context_length points, gaps filled; index of the last real point; points filled)."""
    finite = np.isfinite(points)
    kept = np.flatnonzero(finite)
    if kept.size == 0:
        raise PrepError(path, f"series {item_id!r}", None, "has no numbers to forecast from")
    first, last = int(kept[0]), int(kept[-1])
    start = max(first, last + 1 - context_length)
    tail = points[start:last + 1].astype(np.float64)
    holes = ~finite[start:last + 1]
    if holes.any():  # from the finite points on either side, also those before the tail
        good = np.flatnonzero(finite[:last + 1])
        tail[holes] = np.interp(np.flatnonzero(holes) + start, good, points[good])
    return tail.astype(np.float32), last, int(holes.sum())


def read_table(path: Path, layout: TableLayout, freq: str | None, context_length: int) -> Inputs:
    kind = table_kind(path)
    if kind is None:
        raise not_a_table(path)
    timed, freq = read_timed_series(kind, path, layout, freq)
    contexts, filled = [], 0
    for item_id, points, times in timed:
        tail, last, holes = finite_tail(path, item_id, points, context_length)
        filled += holes
        last_time = times[last] if times is not None and isinstance(times, pd.DatetimeIndex) else None
        contexts.append(Context(item_id, tail, last_time))
    inputs = Inputs(contexts, freq)
    if filled:
        inputs.notes.append(f"{path}: {filled} missing points inside the contexts filled linearly")
    if not inputs.timestamps:
        why = "no frequency could be inferred (pass --freq)" if freq is None else "no datetime timestamps"
        inputs.notes.append(f"{path}: {why}: forecasts are numbered by step 1..H instead of timestamps")
    return inputs
