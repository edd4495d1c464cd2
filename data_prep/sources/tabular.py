"""Tables: CSV, Parquet and Arrow files, in one of three layouts.

- *nested* (Hugging Face datasets, GluonTS): one row per series, a list column ``target``, optional ``item_id``
  and ``freq`` columns. Chosen whenever a list-typed ``target`` column exists (Parquet and Arrow only).
- *long*: one row per observation, id column(s), a timestamp column and value column(s); each (id, value column)
  pair is a series. Chosen when id columns are given or one named ``id``, ``item_id`` or ``unique_id`` exists.
- *wide*: a timestamp column and one column per series (all other columns, unless value columns are given).

Defaults when not given: timestamp column ``timestamp``, ``date``, ``ds``, ``time`` or ``datetime`` (the first
present); long value column ``value``, ``target`` or ``y``, else the only column besides ids and timestamp. Rows are ordered by timestamp within each series
(stable, so equal keys keep file order) and a repeated timestamp within a series is an error. The frequency is the
given one, else the one pandas infers when the first few series agree, else null. Blank cells and the usual NA
spellings are missing points (cleaning interpolates or splits them); any other non-numeric cell is an error naming
its column, row and value. A table is read whole, one file per worker at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.errors import PrepError
from data_prep.index import IndexedDataset, Stager
from data_prep.leakage import LeakageGuard
from data_prep.sources.base import DatasetSpec, Discovery, check_domain

SUFFIXES = {"csv": (".csv",), "parquet": (".parquet", ".pq"), "arrow": (".arrow",)}
ID_NAMES = ("id", "item_id", "unique_id")
TIMESTAMP_NAMES = ("timestamp", "date", "ds", "time", "datetime")
VALUE_NAMES = ("value", "target", "y")
FREQ_SAMPLE = 8  # series looked at to infer a dataset's frequency

Series = list[tuple[str, np.ndarray]]
TimedSeries = list[tuple[str, np.ndarray, pd.Index | None]]  # (name, points, time of each point)


@dataclass(frozen=True)
class TableLayout:
    id_columns: tuple[str, ...] | None = None
    timestamp_column: str | None = None
    value_columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TableSource:
    name: str  # "csv", "parquet" or "arrow"
    input: str
    domain: str = "other"
    dataset: str | None = None  # one dataset of all files; by default each file is a dataset named by its stem
    freq: str | None = None
    layout: TableLayout = field(default_factory=TableLayout)

    def __post_init__(self) -> None:
        if self.name not in SUFFIXES:
            raise ValueError(f"table source must be one of {', '.join(SUFFIXES)}; got {self.name!r}")
        check_domain(self.domain)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": str(Path(self.input).resolve()),
            "domain": self.domain,
            "dataset": self.dataset,
            "freq": self.freq,
            "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in self.layout.__dict__.items()},
        }

    def discover(self) -> Discovery:
        return discover_files(self, SUFFIXES[self.name], "table")

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
        def read_file(path: Path, stager: Stager, prefix: str) -> str | None:
            series, freq = read_series(self.name, path, self.layout, spec.freq)
            stager.add_all((prefix + item_id, values) for item_id, values in series)
            return freq

        return index_files(spec, folder, guard, read_file)


def index_files(spec: DatasetSpec, folder: Path, guard: LeakageGuard, read_file) -> IndexedDataset:
    """Index a dataset of one or more files. `read_file(path, stager, prefix)` stages one file's series (their ids
    prefixed with the file's stem when there are several files) and returns the file's frequency."""
    stager = Stager(folder, spec.domain, spec.dataset, guard)
    try:
        freqs = set()
        for name in spec.files:
            path = Path(name)
            freqs.add(read_file(path, stager, f"{path.stem}/" if len(spec.files) > 1 else ""))
        return stager.finish(freq=freqs.pop() if len(freqs) == 1 else None)
    except BaseException:
        stager.abort()
        raise


def input_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PrepError(path, "--input", str(path), "no such file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if not files:
        raise PrepError(path, "--input", str(path), f"holds no {'/'.join(suffixes)} files")
    return files


def discover_files(source, suffixes: tuple[str, ...], kind: str) -> Discovery:
    """The input files of a file-per-dataset source: one dataset named after each file, or, when the source names
    a dataset, one dataset of all of them."""
    files = input_files(Path(source.input), suffixes)
    if source.dataset:
        return Discovery([DatasetSpec(source.domain, source.dataset, kind, tuple(map(str, files)), source.freq)])
    return Discovery([DatasetSpec(source.domain, f.stem, kind, (str(f),), source.freq) for f in files])


def read_series(kind: str, path: Path, layout: TableLayout, freq: str | None) -> tuple[Series, str | None]:
    """All series of one table file, ordered as documented above, with the dataset frequency."""
    timed, freq = read_timed_series(kind, path, layout, freq)
    return [(name, points) for name, points, _ in timed], freq


def read_timed_series(kind: str, path: Path, layout: TableLayout,
                      freq: str | None) -> tuple[TimedSeries, str | None]:
    """`read_series` with the time of every point (None for nested tables, which carry no timestamps)."""
    if path.stat().st_size == 0:
        raise PrepError(path, "file", "", "empty file")
    if kind == "csv":
        try:
            # skipinitialspace: exports often write "a, b" headers and " " for missing cells
            frame = pd.read_csv(path, skipinitialspace=True)
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise PrepError(path, "csv", None, f"unreadable CSV: {e}") from None
        except pd.errors.EmptyDataError:
            raise PrepError(path, "file", "", "no header and no rows") from None
        return timed_frame_series(frame, path, layout, freq)
    table = _read_arrow_table(kind, path)
    target = table.schema.field("target").type if "target" in table.column_names else None
    if target is not None and (pa.types.is_list(target) or pa.types.is_large_list(target)):
        series, freq = nested_series(table, path, freq)
        return [(name, points, None) for name, points in series], freq
    return timed_frame_series(table.to_pandas(), path, layout, freq)


def _read_arrow_table(kind: str, path: Path) -> pa.Table:
    try:
        if kind == "parquet":
            return pq.read_table(path)
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()  # GluonTS and our own shards
        except pa.ArrowInvalid:
            # Hugging Face `datasets` files (its cache, `save_to_disk`) are Arrow streams: read them its own way.
            import datasets

            return datasets.Dataset.from_file(str(path)).data.table
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepError(path, "file", None, f"not a readable {kind} file: {e}") from None


def nested_series(table: pa.Table, path: Path, freq: str | None) -> tuple[Series, str | None]:
    if table.num_rows == 0:
        raise PrepError(path, "rows", 0, "the table has no rows")
    target = table.column("target").combine_chunks()
    value_type = target.type.value_type
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):
        raise PrepError(path, "target", str(target.type), "multivariate targets are not supported; one list per row")
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise PrepError(path, "target", str(target.type), "not a list of numbers")
    lengths = pc.fill_null(pc.list_value_length(target), 0).to_numpy()
    flat = pc.list_flatten(target).cast(pa.float64()).to_numpy(zero_copy_only=False)
    values = np.split(flat, np.cumsum(lengths)[:-1])
    if "item_id" in table.column_names:
        ids = [str(v) for v in table.column("item_id").to_pylist()]
    else:
        ids = [str(row) for row in range(table.num_rows)]
    if freq is None and "freq" in table.column_names:
        found = sorted(set(table.column("freq").drop_null().to_pylist()))
        if len(found) > 1:
            raise PrepError(path, "freq", found[:3], "rows disagree; give each frequency its own file or --freq")
        freq = found[0] if found else None
    return list(zip(ids, values)), freq


def _require(path: Path, columns: list[str], wanted: list[str]) -> None:
    for c in wanted:
        if c not in columns:
            raise PrepError(path, "column", c, f"missing; the columns are {columns}")


def _first_present(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in columns), None)


def timestamp_column(columns: list[str]) -> str | None:
    """The column taken as the timestamps when none is given (also by timemoe-eval)."""
    return _first_present(columns, TIMESTAMP_NAMES)


def _numeric(column: pd.Series, path: Path, name: str, hint: str = "") -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    text = column.astype("string").str.strip()
    number = pd.to_numeric(text.replace("", pd.NA), errors="coerce")
    bad = number.isna() & text.notna() & (text != "")
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise PrepError(path, f"column {name!r}, row {row + 1}", text.iloc[row], "not a number" + hint)
    return number.to_numpy(dtype=np.float64, na_value=np.nan)


def _time_key(column: pd.Series, path: Path, name: str) -> pd.Series:
    """Something to sort by: datetimes when the column parses as such, else the numbers themselves (e.g. years)."""
    if column.isna().any():
        row = int(np.argmax(column.isna().to_numpy()))
        raise PrepError(path, f"column {name!r}, row {row + 1}", None, "missing timestamp")
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(np.float64)
    try:
        with warnings.catch_warnings():
            # pandas warns when it falls back to parsing each value on its own; NaT is checked below either way
            warnings.simplefilter("ignore", UserWarning)
            return pd.to_datetime(column, utc=True)
    except (ValueError, TypeError):
        parsed = pd.to_datetime(column, utc=True, format="mixed", errors="coerce")
    if parsed.isna().any():
        row = int(np.argmax(parsed.isna().to_numpy()))
        raise PrepError(path, f"column {name!r}, row {row + 1}", column.iloc[row], "not a timestamp")
    return parsed


def _infer_freq(times: list[pd.Series]) -> str | None:
    found = set()
    for t in times[:FREQ_SAMPLE]:
        if len(t) < 3 or not pd.api.types.is_datetime64_any_dtype(t):
            return None
        try:
            with warnings.catch_warnings():
                # pandas 3 announces that infer_freq will return an offset; to_offset below accepts either
                warnings.simplefilter("ignore", DeprecationWarning)
                inferred = pd.infer_freq(pd.DatetimeIndex(t)) or _grid_step(t)
        except (ValueError, TypeError):
            return None
        found.add(inferred and pd.tseries.frequencies.to_offset(inferred).freqstr)
    return found.pop() if len(found) == 1 else None


def _grid_step(time: pd.Series) -> pd.Timedelta | None:
    """The step of a fixed grid with rows missing from it, which pandas infers nothing from: the most common
    spacing, when most spacings are it and every other is a whole number of it. (A calendar frequency with rows
    missing, months or quarters, stays unknown: its spacings are not multiples of one length.)"""
    spacing = np.diff(pd.DatetimeIndex(time).as_unit("ns").asi8)
    steps, counts = np.unique(spacing, return_counts=True)
    step = steps[counts.argmax()]
    if step <= 0 or 2 * counts.max() <= len(spacing) or (spacing % step).any():
        return None
    return pd.Timedelta(int(step), unit="ns")


def frame_series(
    frame: pd.DataFrame, path: Path, layout: TableLayout, freq: str | None
) -> tuple[Series, str | None]:
    """Series of a long or wide table (see the module docstring)."""
    timed, freq = timed_frame_series(frame, path, layout, freq)
    return [(name, points) for name, points, _ in timed], freq


def timed_frame_series(
    frame: pd.DataFrame, path: Path, layout: TableLayout, freq: str | None
) -> tuple[TimedSeries, str | None]:
    """`frame_series` with the time of every point (on the frequency's grid where rows were missing from it):
    where a forecast of the series continues from."""
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if frame.empty:
        raise PrepError(path, "rows", 0, "the table has no rows")
    ts = layout.timestamp_column or timestamp_column(columns)
    if ts is None:
        raise PrepError(path, "column", "timestamp", f"missing (pass --timestamp-column); the columns are {columns}")
    _require(path, columns, [ts])
    if layout.id_columns is not None:
        ids = list(layout.id_columns)
    else:
        ids = [c for c in [_first_present(columns, ID_NAMES)] if c]
    _require(path, columns, ids)
    if layout.value_columns:
        values = list(layout.value_columns)
    elif ids:
        rest = [c for c in columns if c != ts and c not in ids]
        found = _first_present(columns, VALUE_NAMES) or (rest[0] if len(rest) == 1 else None)
        if found is None:
            raise PrepError(path, "column", "value", f"missing (pass --value-columns); the columns are {columns}")
        values = [found]
    else:
        values = [c for c in columns if c != ts]
    _require(path, columns, values)
    if not values:
        raise PrepError(path, "column", None, "no value columns besides the timestamp")

    data = {f"id{i}": frame[c].astype("string") for i, c in enumerate(ids)}
    key_cols = list(data)
    data["time"] = _time_key(frame[ts], path, ts)
    # Wide layout: a text column is more often the series id of a long table than a broken value column.
    hint = "" if ids else "; if it names the series (one row per observation), pass --id-columns {}"
    data.update({f"v{i}": _numeric(frame[c], path, c, hint.format(c)) for i, c in enumerate(values)})
    table = pd.DataFrame(data).sort_values([*key_cols, "time"], kind="stable")
    dup = table.duplicated([*key_cols, "time"])
    if dup.any():
        row = table[dup].iloc[0]
        where = "/".join(str(row[k]) for k in key_cols) or "the table"
        raise PrepError(path, f"column {ts!r}", str(row["time"]), f"repeated timestamp in series {where}")

    groups = list(table.groupby(key_cols, sort=False)) if key_cols else [((), table)]
    if freq is None:
        freq = _infer_freq([group["time"] for _, group in groups])
    series = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        slots = _grid_slots(group["time"], freq)
        times = pd.Index(group["time"])
        if slots is not None:
            times = pd.date_range(times[0], periods=int(slots[-1]) + 1, freq=freq)
        for i, column in enumerate(values):
            name = "/".join([*map(str, key), *([column] if len(values) > 1 or not key_cols else [])])
            points = group[f"v{i}"].to_numpy()
            if slots is not None:
                points = np.full(int(slots[-1]) + 1, np.nan)
                points[slots] = group[f"v{i}"].to_numpy()
            series.append((name, points, times))
    return series, freq


def _grid_slots(time: pd.Series, freq: str | None) -> np.ndarray | None:
    """Positions on a fixed-step grid (hourly, 30min, daily, ...) when rows are missing from it, else None.

    Missing rows become NaN points so that cleaning interpolates or splits them instead of silently joining the
    two sides; calendar frequencies (months, quarters, weeks) are left as they are.
    """
    if freq is None or not pd.api.types.is_datetime64_any_dtype(time) or len(time) < 2:
        return None
    try:
        step = pd.Timedelta(pd.tseries.frequencies.to_offset(freq))
    except (ValueError, TypeError):
        return None
    elapsed = (time - time.iloc[0]).to_numpy()
    slots, rest = np.divmod(elapsed, step.to_timedelta64())
    if rest.any() or slots[-1] == len(time) - 1:
        return None
    return slots.astype(np.int64)
