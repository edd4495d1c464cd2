"""The user's data -> series (through timemoe-prep's own readers) -> each series split in time order -> the train
and validation parts as prepared corpora. The test part is never written anywhere training reads.

`ett`: the ETT borders, 12 / 4 / 4 months of 30 days at the file's sampling rate (as `timemoe-eval` splits ETT
files). Fractions `TRAIN,VAL,TEST`: num_train = int(TRAIN·n), num_test = int(TEST·n), val the rest, per series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep import PrepError, PrepOptions, prepare
from data_prep.leakage import NO_GUARD
from data_prep.sources.base import DatasetSpec, Discovery
from data_prep.sources.tabular import SUFFIXES, TableLayout, index_files, read_series
from data_prep.sources.time300b import read_jsonl

from ..checkpoint.digests import file_digest
from ..data.errors import DataError
from ..evaluate.data import Borders, EvalError, check_ratios, ett_borders, ratio_borders

TABLE_KINDS = {suffix: kind for kind, suffixes in SUFFIXES.items() for suffix in suffixes}
JSONL_SUFFIXES = (".jsonl", ".json")
CORPUS_MANIFEST = "manifest.json"


class FinetuneError(ValueError):
    """Bad input to timemoe-finetune; the message names the file or option and the value."""


@dataclass
class Input:
    path: Path
    kind: str  # csv, parquet, arrow, jsonl or corpus
    series: list[tuple[str, np.ndarray]]
    freq: str | None
    sha256: str  # of the file, or of a corpus's manifest.json


def read_input(path: str | Path) -> Input:
    path = Path(path)
    try:
        if path.is_dir():
            return _read_corpus(path)
        if not path.is_file():
            raise FinetuneError(f"{path}: --data: no such file or directory")
        if path.suffix in JSONL_SUFFIXES:
            series, freq, kind = list(read_jsonl(path)), None, "jsonl"
        elif path.suffix in TABLE_KINDS:
            kind = TABLE_KINDS[path.suffix]
            series, freq = read_series(kind, path, TableLayout(), None)
        else:
            raise FinetuneError(f"{path}: --data: unknown kind of file (expected {', '.join(TABLE_KINDS)}, "
                                f"{', '.join(JSONL_SUFFIXES)} or a timemoe-prep output directory)")
    except PrepError as e:
        raise FinetuneError(str(e)) from None
    return Input(path, kind, [(name, np.asarray(v, dtype=np.float64)) for name, v in series], freq,
                 file_digest(path)[1])


def _read_corpus(path: Path) -> Input:
    from ..data.corpus import read_manifest
    from ..data.shards import ShardStore

    if not (path / CORPUS_MANIFEST).is_file():
        raise FinetuneError(f"{path}: --data: a directory, but not a timemoe-prep output (no {CORPUS_MANIFEST})")
    try:
        store = ShardStore.scan(read_manifest(path))
    except DataError as e:
        raise FinetuneError(str(e)) from None
    freqs = {d.get("freq") for d in store.manifest.datasets.values()}
    series = [(f"sequence {s}", np.array(store.sequence(s), dtype=np.float64)) for s in range(len(store))]
    return Input(path, "corpus", series, freqs.pop() if len(freqs) == 1 else None,
                 file_digest(path / CORPUS_MANIFEST)[1])


def parse_split(text: str) -> str | tuple[float, float, float]:
    if text == "ett":
        return "ett"
    try:
        return check_ratios(tuple(float(v) for v in text.split(",")))
    except ValueError as e:  # EvalError is one; float("x") the other
        why = str(e) if isinstance(e, EvalError) else "expected ett or three comma-separated fractions"
        raise FinetuneError(f"--split {text}: {why}") from None


def rows_per_hour(freq: str | None, path: Path) -> float:
    """Rows per hour of a regularly sampled file (`ett` borders are in months)."""
    try:
        step = pd.Timedelta(pd.tseries.frequencies.to_offset(freq)).total_seconds() if freq else None
    except (ValueError, TypeError):
        step = None
    if not step:
        raise FinetuneError(f"{path}: --split ett needs a fixed sampling rate (hourly, 15 min, ...), and none could "
                            f"be told from the file (frequency {freq!r}); give fractions, e.g. --split 0.7,0.1,0.2")
    return 3600.0 / step


@dataclass(frozen=True)
class SeriesSplit:
    name: str
    length: int
    borders: Borders


def split_series(data: Input, split, window_points: int, longest_horizon: int) -> list[SeriesSplit]:
    """Every series' borders; each train part must hold one training window and each test part the longest
    horizon. A series that cannot is an error naming it (nothing is dropped silently)."""
    rate = rows_per_hour(data.freq, data.path) if split == "ett" else None
    out = []
    for name, values in data.series:
        n = len(values)
        try:
            b = ett_borders(n, rate, f"{data.path}: series {name!r}") if rate else ratio_borders(n, split)
        except EvalError as e:
            raise FinetuneError(f"{e}; shorter than the --split needs") from None
        n_train, n_test = b.train[1] - b.train[0], b.test[1] - b.test[0]
        if n_train < window_points:
            raise FinetuneError(f"{data.path}: series {name!r}: {n} points leave {n_train} for training, shorter "
                                f"than one window ({window_points} points = data.max_length + 1)")
        if n_test < longest_horizon or b.val[1] == b.val[0]:
            raise FinetuneError(f"{data.path}: series {name!r}: {n} points leave {n_test} for the test split and "
                                f"{b.val[1] - b.val[0]} for validation; need >= {longest_horizon} (the longest "
                                "horizon) and >= 1")
        out.append(SeriesSplit(name, n, b))
    if not out:
        raise FinetuneError(f"{data.path}: no series")
    return out


@dataclass(frozen=True)
class PartSource:
    """One part (train or val) of every series as a timemoe-prep source: the arrays the split saved to `input`
    (an .npz of `names` and `s0`, `s1`, ...), staged by timemoe-prep's own indexer."""

    input: str
    dataset: str
    freq: str | None
    name: str = "finetune"

    def describe(self) -> dict:
        return {"name": self.name, "input": str(Path(self.input).resolve()), "dataset": self.dataset,
                "freq": self.freq}

    def discover(self) -> Discovery:
        return Discovery([DatasetSpec("other", self.dataset, "npz", (self.input,), self.freq)])

    def index(self, spec: DatasetSpec, folder: Path, guard):
        def read_file(path: Path, stager, prefix: str) -> str | None:
            with np.load(path) as parts:
                stager.add_all((str(name), parts[f"s{i}"]) for i, name in enumerate(parts["names"]))
            return self.freq

        return index_files(spec, folder, guard, read_file)


def write_part(data: Input, splits: list[SeriesSplit], part: str, out: Path) -> Path:
    """The `part` ("train" or "val") of every series as a prepared corpus in `out`. The leakage guard is off: this
    corpus is the user's own training data by design, and the held-out test part is simply not in it."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = out.parent / f"{part}.npz"
    pieces = {f"s{i}": values[slice(*getattr(s.borders, part))] for i, ((_, values), s) in
              enumerate(zip(data.series, splits))}
    np.savez(arrays, names=np.array([s.name for s in splits]), **pieces)
    prepare(PartSource(str(arrays), f"{data.path.stem}-{part}", data.freq), out,
            PrepOptions(workers=1, guard=NO_GUARD, progress=False, overwrite=True))
    arrays.unlink()
    return out


def split_record(data: Input, split, splits: list[SeriesSplit]) -> dict:
    """What was trained on and what was held out, by row index per series (training_data.json's `split`).
    Series with the same borders are listed once, with their names."""
    groups: dict[tuple, list[str]] = {}
    for s in splits:
        groups.setdefault((s.length, s.borders), []).append(s.name)
    return {"file": str(data.path.resolve()), "kind": data.kind, "sha256": data.sha256, "freq": data.freq,
            "split": split if split == "ett" else list(split),
            "trained_on": "train", "validated_on": "val", "never_read_by_training": "test and any rows after it",
            "series": [{"names": names, "length": length, "train": list(b.train), "val": list(b.val),
                        "test": list(b.test)} for (length, b), names in groups.items()]}
