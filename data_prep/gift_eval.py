"""GIFT-Eval's data and test protocol as facts: which configurations a folder holds, which terms each is scored at,
and which points of which series each term's test windows cover.

The layout (the benchmark's Hugging Face release, downloaded as it is): a folder DIR holding one `datasets`
``save_to_disk`` directory per configuration, named by its path under DIR (``electricity/15T``, ``m4_weekly``,
``hospital``); each row is one series, ``{item_id, start, freq, target}``, ``target`` a list of points or a
``[variates, points]`` list of lists; other fields are ignored.

The protocol is that of GIFT-Eval's own ``Dataset`` (``src/gift_eval/data.py``), on which its leaderboard is
computed:

- frequency: the first row's ``freq``, reduced to its base unit (anchors dropped, ``MS`` -> ``M``, pandas' new
  aliases back to the old ones: ``h`` -> ``H``, ``min`` -> ``T``, ``s`` -> ``S``, ``ME`` -> ``M``, ``QE`` -> ``Q``,
  ``YE``/``Y`` -> ``A``);
- prediction length: a base per unit (M 12, W 8, D 30, H 48, T 48, S 60; configurations whose name contains "m4":
  A 6, Q 8, M 18, W 13, D 14, H 48) times the term's multiplier (short 1, medium 10, long 15);
- windows: ceil(0.1 x the shortest series / prediction length), at least 1, at most 20; one for "m4" names;
- the test windows of a series of L points: the last ``windows`` non-overlapping spans of ``prediction length``
  points, [L - pl·w + i·pl, L - pl·w + (i+1)·pl) for i = 0 … w-1; everything before a window is its history. A
  multivariate target is scored per variate, each variate its own series named ``<item_id>_dim<v>``;
- terms: GIFT-Eval's official lists for its own configurations (every one short; 21 of them medium and long); any
  other configuration is scored short, and medium and long when its frequency is below a day.

``timemoe-eval gift-eval`` scores these windows; ``timemoe-prep``'s leakage guard and audit look for them in
corpora. Nothing here needs gluonts: the tests check the windows against gluonts' ``split``/``generate_instances``,
which GIFT-Eval uses.

    configs = find_configurations("gift_eval_data")
    for c in configs:
        for term in c.terms:
            pl, w = c.prediction_length(term), c.windows(term)
            for span in c.test_spans(term): ...   # TestSpan(row, variate, item_id, window, start, stop)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import PrepError

TERMS = ("short", "medium", "long")
TERM_MULTIPLIER = {"short": 1, "medium": 10, "long": 15}
TEST_FRACTION = 0.1
MAX_WINDOWS = 20
PRED_LENGTH = {"M": 12, "W": 8, "D": 30, "H": 48, "T": 48, "S": 60}
M4_PRED_LENGTH = {"A": 6, "Q": 8, "M": 18, "W": 13, "D": 14, "H": 48}
# pandas >= 2.2 names some units differently; GIFT-Eval's tables use the old names.
OLD_ALIAS = {"Y": "A", "YE": "A", "QE": "Q", "ME": "M", "h": "H", "min": "T", "s": "S", "us": "U"}

# GIFT-Eval's configurations (their paths under DIR) and the terms its leaderboard scores them at.
SHORT = tuple("""
m4_yearly m4_quarterly m4_monthly m4_weekly m4_daily m4_hourly electricity/15T electricity/H electricity/D
electricity/W solar/10T solar/H solar/D solar/W hospital covid_deaths us_births/D us_births/M us_births/W
saugeenday/D saugeenday/M saugeenday/W temperature_rain_with_missing kdd_cup_2018_with_missing/H
kdd_cup_2018_with_missing/D car_parts_with_missing restaurant hierarchical_sales/D hierarchical_sales/W
LOOP_SEATTLE/5T LOOP_SEATTLE/H LOOP_SEATTLE/D SZ_TAXI/15T SZ_TAXI/H M_DENSE/H M_DENSE/D ett1/15T ett1/H ett1/D
ett1/W ett2/15T ett2/H ett2/D ett2/W jena_weather/10T jena_weather/H jena_weather/D bitbrains_fast_storage/5T
bitbrains_fast_storage/H bitbrains_rnd/5T bitbrains_rnd/H bizitobs_application bizitobs_service bizitobs_l2c/5T
bizitobs_l2c/H""".split())
MEDIUM_LONG = tuple("""
electricity/15T electricity/H solar/10T solar/H kdd_cup_2018_with_missing/H LOOP_SEATTLE/5T LOOP_SEATTLE/H
SZ_TAXI/15T M_DENSE/H ett1/15T ett1/H ett2/15T ett2/H jena_weather/10T jena_weather/H bitbrains_fast_storage/5T
bitbrains_rnd/5T bizitobs_application bizitobs_service bizitobs_l2c/5T bizitobs_l2c/H""".split())
# The leaderboard's names for some datasets (the first part of its `dataset` key).
LEADERBOARD_NAME = {"saugeenday": "saugeen", "temperature_rain_with_missing": "temperature_rain",
                    "kdd_cup_2018_with_missing": "kdd_cup_2018", "car_parts_with_missing": "car_parts"}
# GIFT-Eval's dataset properties, by leaderboard name: (domain, frequency written in the key of a configuration
# whose path has no frequency part, number of variates).
PROPERTIES = {
    "m4_yearly": ("Econ/Fin", "A", 1), "m4_quarterly": ("Econ/Fin", "Q", 1), "m4_monthly": ("Econ/Fin", "M", 1),
    "m4_weekly": ("Econ/Fin", "W", 1), "m4_daily": ("Econ/Fin", "D", 1), "m4_hourly": ("Econ/Fin", "H", 1),
    "electricity": ("Energy", "W", 1), "ett1": ("Energy", "W", 7), "ett2": ("Energy", "W", 7),
    "solar": ("Energy", "W", 1), "hospital": ("Healthcare", "M", 1), "covid_deaths": ("Healthcare", "D", 1),
    "us_births": ("Healthcare", "M", 1), "saugeen": ("Nature", "M", 1), "temperature_rain": ("Nature", "D", 1),
    "kdd_cup_2018": ("Nature", "D", 1), "jena_weather": ("Nature", "D", 21), "car_parts": ("Sales", "M", 1),
    "restaurant": ("Sales", "D", 1), "hierarchical_sales": ("Sales", "W-WED", 1),
    "loop_seattle": ("Transport", "D", 1), "sz_taxi": ("Transport", "H", 1), "m_dense": ("Transport", "D", 1),
    "bitbrains_fast_storage": ("Web/CloudOps", "H", 2), "bitbrains_rnd": ("Web/CloudOps", "H", 2),
    "bizitobs_application": ("Web/CloudOps", "10S", 2), "bizitobs_service": ("Web/CloudOps", "10S", 2),
    "bizitobs_l2c": ("Web/CloudOps", "H", 7),
}
OTHER_DOMAIN = "Other"  # the domain column of a configuration that is not GIFT-Eval's
# Files `save_to_disk` writes into every dataset directory.
SAVED_MARKERS = ("dataset_info.json", "state.json")


def base_unit(freq: str, where: str | Path = "freq") -> str:
    """The unit GIFT-Eval's tables are keyed by: '15T', '15min' -> 'T'; 'W-SAT' -> 'W'; 'A-DEC', 'YE' -> 'A'."""
    try:
        with warnings.catch_warnings():  # pandas' notices about the old aliases GIFT-Eval's data is written with
            warnings.simplefilter("ignore", FutureWarning)
            name = pd.tseries.frequencies.to_offset(freq).name
    except (ValueError, TypeError):
        raise PrepError(where, "freq", freq, "not a pandas frequency") from None
    unit = name.split("-")[0]
    if len(unit) >= 2 and unit.endswith("S"):  # start-anchored (MS, QS, YS): the same unit
        unit = unit[:-1]
    return OLD_ALIAS.get(unit, unit)


def period_freq(freq: str) -> str:
    """The frequency as a pandas Period takes it: offsets that only exist as timestamps' (MS, ME, QE, YE) give
    their period's ('M', 'Q-DEC', 'Y-DEC'); the rest stay as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            pd.Period("2000-01-01", freq=freq)
            return freq
        except ValueError:
            return pd.date_range("2000-01-01", periods=2, freq=freq).to_period().freqstr


def below_a_day(freq: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        offset = pd.tseries.frequencies.to_offset(freq)
    return isinstance(offset, pd.offsets.Tick) and pd.Timedelta(offset) < pd.Timedelta(days=1)


@dataclass(frozen=True)
class TestSpan:
    """One test window of one series: points [start, stop) of variate `variate` (None: a 1-D target) of row `row`."""

    row: int
    variate: int | None
    item_id: str  # as GIFT-Eval names the series it scores: the row's item_id, + "_dim<v>" for a variate
    window: int  # 0 … windows-1, oldest first
    start: int
    stop: int


@dataclass(frozen=True)
class Series:
    """One row: its points as float32 [variates, T] (one variate for a 1-D target)."""

    row: int
    item_id: str
    start: pd.Timestamp
    target_VT: np.ndarray
    multivariate: bool

    def names(self) -> list[str]:
        """The name GIFT-Eval gives each variate's series."""
        if not self.multivariate:
            return [self.item_id]
        return [f"{self.item_id}_dim{v}" for v in range(self.target_VT.shape[0])]


@dataclass(frozen=True)
class Configuration:
    """One ``save_to_disk`` directory under DIR, named by its path there."""

    name: str
    path: Path

    @cached_property
    def dataset(self):
        import datasets  # a heavy import, needed only once a configuration is read

        try:
            return datasets.load_from_disk(str(self.path))
        except (OSError, ValueError, KeyError) as e:
            raise PrepError(self.path, "save_to_disk directory", self.name, f"unreadable ({e})") from None

    @cached_property
    def _first(self) -> dict:
        table = self.dataset.data
        for column in ("item_id", "start", "freq", "target"):
            if column not in table.column_names:
                raise PrepError(self.path, column, None, f"missing: GIFT-Eval rows are {{item_id, start, freq, "
                                                         f"target}}, this one has {table.column_names}")
        if table.num_rows == 0:
            raise PrepError(self.path, "rows", 0, "no series")
        return self.dataset[0]

    @property
    def freq(self) -> str:
        """The first row's, as GIFT-Eval takes it."""
        return str(self._first["freq"])

    @cached_property
    def unit(self) -> str:
        unit = base_unit(self.freq, self.path)
        table = M4_PRED_LENGTH if self.is_m4 else PRED_LENGTH
        if unit not in table:
            raise PrepError(self.path, "freq", self.freq, f"GIFT-Eval's protocol has no prediction length for "
                                                          f"unit {unit!r} ({'M4 ' if self.is_m4 else ''}units: "
                                                          f"{', '.join(table)})")
        return unit

    @property
    def is_m4(self) -> bool:
        return "m4" in self.name  # GIFT-Eval's own test, on the configuration's name

    @property
    def official(self) -> bool:
        return self.name in SHORT

    @property
    def multivariate(self) -> bool:
        first = self._first["target"]
        return len(first) > 0 and isinstance(first[0], list)

    @property
    def variates(self) -> int:
        """Per row, as the data has them (row 0's; the rows of one configuration agree)."""
        return len(self._first["target"]) if self.multivariate else 1

    @property
    def num_variates(self) -> int:
        """The leaderboard's column: GIFT-Eval's dataset properties for its own configurations."""
        return PROPERTIES[self.leaderboard_name][2] if self.official else self.variates

    @property
    def leaderboard_name(self) -> str:
        head = self.name.split("/")[0].lower()
        return LEADERBOARD_NAME.get(head, head)

    @property
    def domain(self) -> str:
        return PROPERTIES[self.leaderboard_name][0] if self.official else OTHER_DOMAIN

    @property
    def terms(self) -> tuple[str, ...]:
        if self.official:
            return TERMS if self.name in MEDIUM_LONG else ("short",)
        return TERMS if below_a_day(self.freq) else ("short",)

    def dataset_key(self, term: str) -> str:
        """The leaderboard's `dataset` column: <name>/<freq>/<term>, the frequency from the path when it has one."""
        if "/" in self.name:
            freq = self.name.split("/")[-1]
            head = "/".join([self.leaderboard_name, *self.name.split("/")[1:-1]])
        else:
            head = self.leaderboard_name
            freq = PROPERTIES[head][1] if self.official else self.freq
        return f"{head}/{freq}/{term}"

    @cached_property
    def lengths(self) -> np.ndarray:
        """Points per row (of its first variate, as GIFT-Eval counts)."""
        import pyarrow.compute as pc

        target = self.dataset.data.column("target")
        if self.multivariate:
            target = pc.list_flatten(pc.list_slice(target, 0, 1))
        return pc.list_value_length(target).to_numpy(zero_copy_only=False).astype(np.int64)

    def prediction_length(self, term: str) -> int:
        table = M4_PRED_LENGTH if self.is_m4 else PRED_LENGTH
        return TERM_MULTIPLIER[term] * table[self.unit]

    def windows(self, term: str) -> int:
        if self.is_m4:
            return 1
        w = math.ceil(TEST_FRACTION * int(self.lengths.min()) / self.prediction_length(term))
        return min(max(1, w), MAX_WINDOWS)

    def fits(self, term: str) -> bool:
        """Every series has at least one point before its first test window (GIFT-Eval's own configurations all
        do; gluonts' split fails on one that does not)."""
        return int(self.lengths.min()) > self.prediction_length(term) * self.windows(term)

    def series(self) -> Iterator[Series]:
        """Every row in order, its target as float32 (missing points NaN)."""
        row = 0
        for batch in self.dataset.data.to_batches(max_chunksize=1024):
            ids, starts = batch.column("item_id").to_pylist(), batch.column("start").to_pylist()
            targets = batch.column("target")
            for i in range(batch.num_rows):
                yield Series(row, str(ids[i]), pd.Timestamp(starts[i]), self._target(targets[i]), self.multivariate)
                row += 1

    def _target(self, scalar) -> np.ndarray:
        values = scalar.values
        if self.multivariate:
            rows = [v.values.to_numpy(zero_copy_only=False) for v in values]
            return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
        return values.to_numpy(zero_copy_only=False).astype(np.float32)[None]

    def test_spans(self, term: str) -> Iterator[TestSpan]:
        """Every test window of every series (per variate), in GIFT-Eval's order: series, then variate, then
        window. Lengths are read from the Arrow offsets; no target is decoded."""
        pl, w = self.prediction_length(term), self.windows(term)
        ids = self.dataset.data.column("item_id").to_pylist()
        for row, (item_id, length) in enumerate(zip(ids, self.lengths.tolist())):
            first = length - pl * w
            for v in range(self.variates):
                name = f"{item_id}_dim{v}" if self.multivariate else str(item_id)
                for i in range(w):
                    yield TestSpan(row, v if self.multivariate else None, name, i, first + i * pl,
                                   first + (i + 1) * pl)


def find_configurations(root: str | Path) -> list[Configuration]:
    """Every ``save_to_disk`` directory under `root` (or `root` itself, when it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise PrepError(root, "--data", str(root), "no such folder (GIFT-Eval's layout: one save_to_disk "
                                                   "directory per configuration)")
    if all((root / m).is_file() for m in SAVED_MARKERS):
        return [Configuration(root.name, root)]
    found = [Configuration(d.relative_to(root).as_posix(), d) for d in sorted(root.rglob("*"))
             if d.is_dir() and all((d / m).is_file() for m in SAVED_MARKERS)]
    if not found:
        raise PrepError(root, "--data", str(root), "holds no save_to_disk directory (dataset_info.json + "
                                                   "state.json): not GIFT-Eval's layout")
    return found
