"""Long-horizon benchmark data: a table's channels, the standard train/val/test borders, train-split scaling, test
windows.

A benchmark is any table timemoe-prep reads (a wide or long CSV, Parquet or Arrow file, read by prep's own reader
in data_prep/sources/tabular.py), its series grouped by length: each group is one dataset of the report (a wide
table is one group, its columns the channels). Missing points stay missing here (NaN); how a window's context is
filled and which truth points are scored is `long_horizon.py`'s to say.

Borders follow the Informer / Time-Series-Library protocol the paper uses: ETTh* 12/4/4 months of hourly rows,
ETTm* the same months at 15 minutes, any other table 70% train / 10% val / 20% test (num_train = int(0.7 n),
num_test = int(0.2 n), val the rest). The test windows' contexts may reach back into val (and train): the first
test window's context ends where the test split begins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import PrepError
from data_prep.sources.tabular import TableLayout, read_timed_series
from ..forecast import ForecastError
from ..forecast.inputs import table_kind

HOURS_PER_MONTH = 30 * 24
ETT_MONTHS = (12, 4, 4)
# Rows per hour of the ETT variants; the file stem decides which one a CSV is.
ETT_ROWS_PER_HOUR = {"etth1": 1, "etth2": 1, "ettm1": 4, "ettm2": 4}
DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # train, val, test
# Spacing of the timestamps (seconds) -> season length of the seasonal-naive baseline.
SEASONS = {5 * 60: 288, 10 * 60: 144, 15 * 60: 96, 30 * 60: 48, 3600: 24, 86400: 7, 7 * 86400: 52}
MONTH_SECONDS = (28 * 86400, 31 * 86400)  # monthly data: a season of 12


class EvalError(ForecastError):
    """Bad input to timemoe-eval (a model directory it cannot load raises the ForecastError itself)."""


@dataclass
class Series:
    path: Path
    columns: list[str]
    values_TC: np.ndarray  # float64, raw; NaN where a point is missing
    season_length: int | None  # from the timestamps' spacing or the frequency; None when it cannot be told
    freq: str | None  # the frequency the table was read at (given or inferred), None when unknown
    name: str | None = None  # the dataset's name in reports; None: the file's stem

    @property
    def dataset(self) -> str:
        return self.name or self.path.stem


def read_table(path: str | Path, columns: list[str] | None = None, layout: TableLayout = TableLayout(),
               freq: str | None = None) -> list[Series]:
    """The series of a table as timemoe-prep reads it, grouped by length (one `Series` each, in order of first
    appearance); `columns`: only the series of those names (a wide table's columns, a long table's ids)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    kind = table_kind(path)
    if kind is None:
        raise EvalError(f"{path}: not a table timemoe-eval reads (.csv, .parquet or .arrow, as timemoe-prep)")
    try:
        timed, freq = read_timed_series(kind, path, layout, freq)
    except PrepError as e:
        raise EvalError(str(e)) from None
    if columns:
        names = [name for name, _, _ in timed]
        missing = [c for c in columns if c not in names]
        if missing:
            raise EvalError(f"{path}: column(s) {missing} not found (--columns); the file has "
                            f"{names[:20]}{' ...' if len(names) > 20 else ''}")
        timed = [next(t for t in timed if t[0] == c) for c in columns]
    groups: dict[int, list] = {}
    for name, points, times in timed:
        if not np.isfinite(points).any():
            raise EvalError(f"{path}: series {name!r}: has no numbers")
        groups.setdefault(len(points), []).append((name, points, times))
    return [Series(path, [name for name, _, _ in group], np.stack([p for _, p, _ in group], axis=1).astype(np.float64),
                   season_length(freq, group[0][2]), freq, path.stem if len(groups) == 1 else f"{path.stem} ({n} points)")
            for n, group in groups.items()]


def season_length(freq: str | None, times: pd.Index | None = None) -> int | None:
    """The seasonal-naive period: from the median spacing of the timestamps when they are datetimes, else from the
    frequency (24 hourly, 7 daily, 12 monthly, ...); None when neither tells."""
    step = None
    if isinstance(times, pd.DatetimeIndex) and len(times) > 1:
        step = pd.Series(times[:1000]).diff().dropna().median().total_seconds()
    elif freq is not None:
        offset = pd.tseries.frequencies.to_offset(freq)
        try:
            step = pd.Timedelta(offset).total_seconds()
        except ValueError:  # calendar offsets have no fixed length
            step = 30 * 86400 if offset.name.startswith(("M", "BM", "SM")) else None
    if step is None:
        return None
    if MONTH_SECONDS[0] <= step <= MONTH_SECONDS[1]:
        return 12
    return SEASONS.get(int(step))


@dataclass(frozen=True)
class Borders:
    """Row ranges [start, end) of the three splits."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


def split_borders(n_rows: int, dataset: str, ratios: tuple[float, float, float] = DEFAULT_RATIOS,
                  source: str = "series", rows_per_hour: float | None = None) -> Borders:
    """The ETT borders when `rows_per_hour` is given or the stem names an ETT file, else the `ratios` ones."""
    rows_per_hour = rows_per_hour or ETT_ROWS_PER_HOUR.get(dataset.lower())
    if rows_per_hour is not None:
        return ett_borders(n_rows, rows_per_hour, f"{source}: {dataset}")
    return ratio_borders(n_rows, ratios)


def ett_borders(n_rows: int, rows_per_hour: float, source: str = "series") -> Borders:
    """12 / 4 / 4 months of 30 days at `rows_per_hour`; rows past the 20 months belong to no split."""
    n_train, n_val, n_test = (round(m * HOURS_PER_MONTH * rows_per_hour) for m in ETT_MONTHS)
    if n_rows < n_train + n_val + n_test:
        raise EvalError(f"{source} needs {n_train + n_val + n_test} rows for its 12/4/4-month splits, "
                        f"it has {n_rows}")
    return Borders((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_train + n_val + n_test))


def check_ratios(ratios) -> tuple[float, float, float]:
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise EvalError(f"split ratios {tuple(ratios)}: need three positive fractions (train, val, test) summing "
                        "to 1")
    return tuple(ratios)


def ratio_borders(n_rows: int, ratios: tuple[float, float, float]) -> Borders:
    """num_train = int(ratio_train · n), num_test = int(ratio_test · n), val the rest."""
    ratios = check_ratios(ratios)
    n_train, n_test = int(n_rows * ratios[0]), int(n_rows * ratios[2])
    n_val = n_rows - n_train - n_test
    return Borders((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_train + n_val + n_test))


def fit_scaler(series: Series, borders: Borders):
    """Per-channel mean and (population) std over the real points of the train split; constant channels get std 1."""
    train_TC = series.values_TC[borders.train[0]:borders.train[1]]
    empty = np.flatnonzero(~np.isfinite(train_TC).any(axis=0))
    if empty.size:
        raise EvalError(f"{series.path}: series {series.columns[empty[0]]!r} has no number in its train split (rows "
                        f"[{borders.train[0]}, {borders.train[1]})) to scale it by")
    mean_C, std_C = np.nanmean(train_TC, axis=0), np.nanstd(train_TC, axis=0)
    return mean_C, np.where(std_C > 0, std_C, 1.0)


def num_test_windows(borders: Borders, horizon: int) -> int:
    return borders.test[1] - borders.test[0] - horizon + 1


def window_starts(borders: Borders, context_len: int, horizon: int, max_windows: int | None = None,
                       source: str = "series") -> np.ndarray:
    """Row index where each test window's context begins, stride 1; with max_windows N, N evenly spaced windows
    including the first and the last: the k-th is window ⌊k·(n−1)/(N−1)⌋."""
    first = borders.test[0] - context_len
    n_windows = num_test_windows(borders, horizon)
    if first < 0:
        raise EvalError(f"{source}: context length {context_len} reaches before the first row (train + val hold "
                        f"{borders.test[0]} rows)")
    if n_windows < 1:
        raise EvalError(f"{source}: the test split holds {borders.test[1] - borders.test[0]} rows, fewer than "
                        f"horizon {horizon}")
    index = np.arange(n_windows)
    if max_windows is not None and max_windows < n_windows:
        if max_windows < 1:
            raise EvalError(f"--max-windows {max_windows}: must be at least 1")
        index = np.arange(max_windows) * (n_windows - 1) // max(max_windows - 1, 1)
    return first + index
