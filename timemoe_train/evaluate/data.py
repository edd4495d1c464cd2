"""Long-horizon benchmark data: CSV channels, the standard train/val/test borders, train-split scaling, test windows.

Borders follow the Informer / Time-Series-Library protocol the paper uses: ETTh* 12/4/4 months of hourly rows,
ETTm* the same months at 15 minutes, any other CSV 70% train / 10% val / 20% test (num_train = int(0.7 n),
num_test = int(0.2 n), val the rest). The test windows' contexts may reach back into val (and train): the first
test window's context ends where the test split begins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.sources.tabular import timestamp_column
from ..forecast import ForecastError

HOURS_PER_MONTH = 30 * 24
ETT_MONTHS = (12, 4, 4)
# Rows per hour of the ETT variants; the file stem decides which one a CSV is.
ETT_ROWS_PER_HOUR = {"etth1": 1, "etth2": 1, "ettm1": 4, "ettm2": 4}
DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # train, val, test
# Median spacing of the date column (seconds) -> season length of the seasonal-naive baseline.
SEASONS = {5 * 60: 288, 10 * 60: 144, 15 * 60: 96, 30 * 60: 48, 3600: 24, 86400: 7, 7 * 86400: 52}


class EvalError(ForecastError):
    """Bad input to timemoe-eval (a model directory it cannot load raises the ForecastError itself)."""


@dataclass
class Series:
    path: Path
    columns: list[str]
    values_TC: np.ndarray  # float64, raw
    season_length: int | None  # from the date column's spacing; None when it cannot be told
    date_column: str | None  # None: the file has none
    name: str | None = None  # the dataset's name in reports; None: the file's stem

    @property
    def dataset(self) -> str:
        return self.name or self.path.stem


def read_csv(path: str | Path, columns: list[str] | None = None, date_column: str | None = None) -> Series:
    """The channels of a benchmark CSV. The date column, when not given, is found as timemoe-prep finds its
    timestamp column (the first of timestamp, date, ds, time, datetime)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: CSV file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise EvalError(f"{path}: not a readable CSV ({e})") from None
    if date_column is None:
        date_column = timestamp_column(list(df.columns))
    elif date_column not in df.columns:
        raise EvalError(f"{path}: no column {date_column!r} (--date-column); the file has {list(df.columns)}")
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise EvalError(f"{path}: column(s) {missing} not found (--columns); the file has {list(df.columns)}")
    else:
        columns = [c for c in df.columns if c != date_column]
    if not columns:
        raise EvalError(f"{path}: no value columns" + (f" besides {date_column!r}" if date_column else ""))
    values = {}
    for c in columns:
        col = pd.to_numeric(df[c], errors="coerce")
        bad = np.flatnonzero(col.isna().to_numpy())
        if bad.size:
            raise EvalError(f"{path}: column {c!r} has a missing or non-numeric value {df[c].iloc[bad[0]]!r} at "
                            f"data row {bad[0] + 1} ({bad.size} such rows)")
        values[c] = col.to_numpy(np.float64)
    season = infer_season_length(df[date_column]) if date_column else None
    return Series(path, list(columns), np.stack([values[c] for c in columns], axis=1), season, date_column)


def infer_season_length(dates: pd.Series) -> int | None:
    stamps = pd.to_datetime(dates.iloc[:1000], errors="coerce").dropna()
    if len(stamps) < 2:
        return None
    step = stamps.diff().dropna().median().total_seconds()
    if 28 * 86400 <= step <= 31 * 86400:
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


def fit_scaler(values_TC: np.ndarray, borders: Borders):
    """Per-channel mean and (population) std over the train split; constant channels get std 1."""
    train_TC = values_TC[borders.train[0]:borders.train[1]]
    mean_C, std_C = train_TC.mean(axis=0), train_TC.std(axis=0)
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
