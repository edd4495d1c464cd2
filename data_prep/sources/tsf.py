"""Monash ``.tsf`` files: ``@attribute`` / ``@frequency`` header lines, then ``@data`` lines
``attr1:attr2:...:v1,v2,...`` with ``?`` for a missing point.

The item id is the ``series_name`` attribute when declared, else the first attribute. Monash frequency words map
to pandas offset aliases (``half_hourly`` -> ``30min``); unknown words are kept as written. Each file is a dataset
named by its stem unless ``dataset`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.index import IndexedDataset, Stager
from data_prep.leakage import LeakageGuard
from data_prep.sources.base import DatasetSpec, Discovery, check_domain
from data_prep.sources.tabular import discover_files, index_files

FREQ_ALIASES = {
    "yearly": "Y",
    "quarterly": "Q",
    "monthly": "M",
    "weekly": "W",
    "daily": "D",
    "hourly": "h",
    "half_hourly": "30min",
    "10_minutes": "10min",
    "minutely": "min",
    "4_seconds": "4s",
}


@dataclass(frozen=True)
class TsfSource:
    input: str
    domain: str = "other"
    dataset: str | None = None
    freq: str | None = None  # overrides the file's @frequency
    name: str = "tsf"

    def __post_init__(self) -> None:
        check_domain(self.domain)

    def describe(self) -> dict[str, Any]:
        input_path = str(Path(self.input).resolve())
        return {"name": self.name, "input": input_path, "domain": self.domain, "dataset": self.dataset, "freq": self.freq}

    def discover(self) -> Discovery:
        return discover_files(self, (".tsf",), "tsf")

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
        def read_file(path: Path, stager: Stager, prefix: str) -> str | None:
            file_freq = read_tsf(path, stager, prefix=prefix)
            return spec.freq or file_freq

        return index_files(spec, folder, guard, read_file)


def _values(text: str, path: Path, line_no: int) -> np.ndarray:
    items = text.split(",")
    try:
        return np.array(["nan" if v.strip() == "?" else v for v in items], dtype=np.float64)
    except ValueError:
        for i, v in enumerate(items):
            try:
                float("nan" if v.strip() == "?" else v)
            except ValueError:
                raise PrepError(path, f"line {line_no}, value {i + 1}", v, "not a number") from None
        raise


def read_tsf(path: Path, stager: Stager, prefix: str = "") -> str | None:
    """Stage every series of ``path``; returns the file's frequency alias."""
    if path.stat().st_size == 0:
        raise PrepError(path, "file", "", "empty file")
    attributes: list[str] = []
    freq = None
    in_data = False
    found = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise PrepError(path, f"line {line_no}", line[:60], "expected an @ header line before @data")
                tag, _, rest = line.partition(" ")
                tag = tag.lower()
                if tag == "@attribute":
                    attributes.append(rest.split()[0] if rest.split() else "")
                elif tag == "@frequency":
                    freq = FREQ_ALIASES.get(rest.strip(), rest.strip() or None)
                elif tag == "@data":
                    in_data = True
                continue
            fields = line.split(":", len(attributes))
            if len(fields) != len(attributes) + 1:
                raise PrepError(
                    path, f"line {line_no}", line[:60], f"expected {len(attributes)} attributes then values"
                )
            named = dict(zip(attributes, fields))
            item_id = named.get("series_name", fields[0] if attributes else f"T{found + 1}")
            stager.add(prefix + item_id, _values(fields[-1], path, line_no))
            found += 1
    if not in_data:
        raise PrepError(path, "@data", None, "missing: no @data line")
    if not found:
        raise PrepError(path, "@data", None, "no series after @data")
    return freq
