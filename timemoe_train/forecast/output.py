"""Where timemoe-forecast writes: forecasts of a part as one Arrow table, built column by column (no Python loop over
its series), and the three places they go.

- `ShardFolder` (`--out FOLDER/`): one Parquet file per part, written under a temporary name and renamed, so a
  file under its final name is finished; `_forecast.json` records what the folder holds forecasts of, and a re-run
  with the same settings skips the parts already there.
- `SingleFile` (`--out f.csv` / `f.parquet`): every part appended to one temporary file, renamed over `f` at the
  end: the output appears whole or not at all.
- `SingleFile(None)`: CSV on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .model import ForecastError
from .stream import Part

FILE_SUFFIXES = (".csv", ".parquet")
# In a shard folder, beside the parts: names that Parquet readers (pyarrow, pandas, Spark) skip, so the folder reads
# as one dataset.
RECORD = "_forecast.json"  # the settings its forecasts were made with
LOG = "_forecast.log"  # progress, appended by every process
PARTIAL = ".partial"


def forecast_table(part: Part, forecasts_NH: np.ndarray) -> pa.Table:
    """Long: `item_id`, `timestamp` (continuing each series at its frequency) or `step` (1..H), `forecast`."""
    n, horizon = forecasts_NH.shape
    columns = {"item_id": pc.take(part.item_id, pa.array(np.repeat(np.arange(n), horizon)))}
    if part.last_time_N is not None and part.freq is not None:
        columns["timestamp"] = pa.array(future_times(part.last_time_N, part.freq, horizon), pa.timestamp("ns"))
    else:
        columns["step"] = pa.array(np.tile(np.arange(1, horizon + 1, dtype=np.int64), n))
    columns["forecast"] = pa.array(forecasts_NH.reshape(-1).astype(np.float32, copy=False))
    return pa.table(columns)


def future_times(last_N: np.ndarray, freq: str, horizon: int) -> np.ndarray:
    """[N * H] datetime64[ns]: the H times after each series' last one, as `pd.date_range(last, periods=H + 1,
    freq)[1:]` gives them; computed once per distinct last time (most series of a table end together)."""
    unique_U, inverse_N = np.unique(last_N, return_inverse=True)
    times_UH = np.stack([pd.date_range(u, periods=horizon + 1, freq=freq)[1:].to_numpy("datetime64[ns]")
                         for u in unique_U])
    return times_UH[inverse_N.reshape(-1)].reshape(-1)


def _atomic_path(out: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=PARTIAL)
    os.close(fd)
    return Path(tmp)


class ShardFolder:
    """`--out FOLDER/`: a Parquet file per part, each written whole."""

    def __init__(self, folder: Path):
        self.folder = folder

    def prepare(self, settings: dict) -> list[str]:
        """Made or checked against its record (run once, before any process writes): the finished parts it holds.
        A folder of other files, or of forecasts made with other settings, is refused."""
        record = self.folder / RECORD
        if self.folder.exists() and not self.folder.is_dir():
            raise ForecastError(f"{self.folder}: --out exists and is not a folder")
        if record.is_file():
            before = json.loads(record.read_text())
            changed = [k for k in settings if before.get(k) != settings[k]]
            if changed:
                k = changed[0]
                raise ForecastError(f"{record}: the forecasts in {self.folder} were made with {k} = {before.get(k)!r}, "
                                    f"this command has {settings[k]!r}: give another --out, or empty this one")
        elif self.folder.is_dir() and any(p.name != LOG for p in self.folder.iterdir()):
            raise ForecastError(f"{self.folder}: --out folder holds files that timemoe-forecast did not write (no "
                                f"{RECORD}): give a new or empty folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = _atomic_path(record)
            tmp.write_text(json.dumps(settings, indent=1) + "\n")
            os.replace(tmp, record)
        return self.finished()

    def finished(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob("*.parquet") if not p.name.startswith("."))

    def write(self, name: str, table: pa.Table) -> None:
        for stale in self.folder.glob(f".{name}.*{PARTIAL}"):  # left by a process killed while writing it
            stale.unlink(missing_ok=True)
        tmp = _atomic_path(self.folder / name)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class SingleFile:
    """`--out f.csv` / `f.parquet` (or stdout: None): every part appended, the file renamed into place at the end."""

    def __init__(self, out: Path | None):
        self.out, self.tmp, self.parquet, self.schema = out, None, None, None

    def write(self, name: str, table: pa.Table) -> None:
        if self.schema is not None and not table.schema.equals(self.schema):
            raise ForecastError(f"{self.out}: the inputs differ in whether forecasts get timestamps (columns "
                                f"{self.schema.names} then {table.schema.names}): give an --out folder instead")
        first = self.schema is None
        self.schema = table.schema
        if self.out is None:
            table.to_pandas().to_csv(sys.stdout, index=False, header=first)
            return
        if first:
            self.tmp = _atomic_path(self.out)
        if self.out.suffix.lower() == ".parquet":
            if first:
                self.parquet = pq.ParquetWriter(self.tmp, table.schema)
            self.parquet.write_table(table)
        else:
            # pandas writes times as "2024-01-01 00:00:00" and floats as users' CSVs hold them
            table.to_pandas().to_csv(self.tmp, index=False, header=first, mode="w" if first else "a")

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.tmp is not None:
            if self.parquet is not None:
                self.parquet.close()
            self.tmp.unlink(missing_ok=True)
