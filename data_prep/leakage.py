"""Leakage guard: series of the benchmarks a model is evaluated on never enter its training corpus.

Two rules. By name: a series whose id names a benchmark of the ETT family (ETTh1, ETTh2, ETTm1, ETTm2) is excluded
whether or not its content is at hand. By content: every stride-1 window of ``block`` points of every channel of
each benchmark CSV is z-normalised (which makes the match blind to units and offsets), rounded to 1/100 of a
standard deviation and hashed; a training series is excluded when any of its non-overlapping ``block``-point
blocks hashes to one of those. A copy of at least 2·``block`` consecutive benchmark points, rescaled or not,
contains an aligned block, so it is caught wherever it starts. Windows with fewer than ``block // 4`` distinct
rounded values (flat stretches, rare counts) are not hashed on either side: they say nothing about origin.

A third rule, for GIFT-Eval (``timemoe-prep --exclude-benchmark gift-eval:DIR``), cuts instead of dropping: the
stretch of a series that holds the scored test windows of a GIFT-Eval configuration is removed and the rest of the
series kept (``data_prep.gift_leakage``), as GIFT-Eval's own pretraining corpus keeps those series' history.

Every source's series pass the guard of :class:`~data_prep.pipeline.PrepOptions` (``default_guard`` unless given:
the name rule plus the repository's shipped ETTh1); the manifest records it under ``leakage_guard``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.errors import PrepError
from data_prep.shards import sha256_file

ETT_NAMES = r"(?i)\bett[hm][12]\b"
# The benchmark the demo evaluates on, as the repository ships it (absent from a non-editable install).
SHIPPED_ETTH1 = Path(__file__).resolve().parents[1] / "examples" / "data" / "ETTh1.csv"
_MULTIPLIERS = np.random.default_rng(0x1EA4).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def block_hashes(windows_NB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of the informative rows of ``windows_NB`` (float64; a row holding NaN/inf is not informative) and
    those rows' indices: each row z-normalised, rounded to 1/100 of its standard deviation, hashed."""
    block = windows_NB.shape[1]
    std_N = windows_NB.std(axis=1)
    rows_N = np.flatnonzero(std_N > 1e-12 * np.maximum(np.abs(windows_NB).max(axis=1), 1e-300))
    # A gathered copy: both sides of a match reduce contiguous rows, so equal values give equal bits.
    kept_NB = windows_NB[rows_N]
    q_NB = np.rint((kept_NB - kept_NB.mean(axis=1, keepdims=True)) / std_N[rows_N, None] * 100).astype(np.int64)
    distinct_N = 1 + (np.diff(np.sort(q_NB, axis=1), axis=1) != 0).sum(axis=1)
    rich_N = distinct_N >= block // 4
    # A polynomial hash in uint64 arithmetic (wrapping), vectorised over windows.
    return q_NB[rich_N].astype(np.uint64) @ _MULTIPLIERS[:block], rows_N[rich_N]


def _window_hashes(values: np.ndarray, block: int, stride: int) -> np.ndarray:
    """Hashes of the informative windows values[i:i + block] for i = 0, stride, 2·stride, ... of the finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)] if not np.isfinite(values).all() else values
    if len(values) < block:
        return np.empty(0, dtype=np.uint64)
    return block_hashes(np.lib.stride_tricks.sliding_window_view(values, block)[::stride])[0]


@dataclass(frozen=True)
class LeakageGuard:
    """The benchmarks (CSV files, one series per numeric column) that a corpus must not contain. ``name_pattern=None``
    and no benchmarks is the guard switched off (``timemoe-prep --no-leakage-guard``: fine-tuning on a benchmark's
    own training split, say), which the manifest records as such."""

    benchmarks: tuple[str, ...] = ()
    block: int = 64
    name_pattern: str | None = ETT_NAMES
    gift_eval: tuple[str, ...] = ()  # GIFT-Eval data directories whose test windows are cut out
    index_dir: str | None = field(default=None, compare=False)  # where `ready` built their index for the workers
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.gift_eval:
            from data_prep.gift_leakage import check_data

            for path in self.gift_eval:
                check_data(path)
        for p in self.benchmarks:
            if not Path(p).is_file():
                raise PrepError(p, "--benchmarks", str(p), "no such file (a benchmark CSV to keep out of the corpus)")
            try:
                channels = self._channels(Path(p))
            except (OSError, ValueError) as e:  # pandas' parser and decoding errors are ValueErrors
                raise PrepError(p, "--benchmarks", str(p), f"not a readable CSV: {e}") from None
            if not channels:
                raise PrepError(p, "--benchmarks", str(p), "holds no numeric column to guard against")

    @property
    def active(self) -> bool:
        return self.name_pattern is not None or bool(self.benchmarks) or bool(self.gift_eval)

    def describe(self) -> dict:
        rule = (f"excluded: ids matching {self.name_pattern!r}, and series sharing a z-normalised {self.block}-point "
                "window with a benchmark channel") if self.active else "off (--no-leakage-guard): nothing excluded"
        record = {
            "rule": rule,
            "name_pattern": self.name_pattern,
            "block": self.block,
            "benchmarks": [self._benchmark_record(Path(p)) for p in self.benchmarks],
        }
        if self.gift_eval:  # absent otherwise, so that corpora prepared before it existed are still reused
            from data_prep.gift_leakage import describe

            key = ("gift_eval",)
            if key not in self._cache:
                self._cache[key] = [describe(p) for p in self.gift_eval]
            record["rule"] += "; cut: the stretches holding a GIFT-Eval configuration's test windows"
            record["gift_eval"] = self._cache[key]
        return record

    def read(self, progress: bool = False) -> None:
        """Read the GIFT-Eval data now, with a progress bar (``describe`` and ``ready`` read it otherwise, silently)."""
        from data_prep.gift_leakage import configurations

        for root in self.gift_eval:
            configurations(root, progress=progress)

    def ready(self, folder: Path) -> LeakageGuard:
        """This guard with its GIFT-Eval index built under ``folder``, for workers to memory-map (itself when it has
        none)."""
        if not self.gift_eval:
            return self
        from data_prep.gift_leakage import build_index

        build_index(self.gift_eval, folder)
        return replace(self, index_dir=str(folder), _cache={})

    def _benchmark_record(self, path: Path) -> dict:
        return {"file": path.name, "sha256": sha256_file(path), "channels": list(self._channels(path))}

    def _channels(self, path: Path) -> dict[str, np.ndarray]:
        key = ("channels", str(path))
        if key not in self._cache:
            frame = pd.read_csv(path)
            numeric = frame.select_dtypes("number")
            self._cache[key] = {str(c): numeric[c].to_numpy(np.float64) for c in numeric.columns}
        return self._cache[key]

    @cached_property
    def _hashes(self) -> dict[int, str]:
        """Window hash -> the benchmark channel it came from."""
        out: dict[int, str] = {}
        for p in self.benchmarks:
            for column, values in self._channels(Path(p)).items():
                for h in _window_hashes(values, self.block, 1).tolist():
                    out.setdefault(h, f"{Path(p).name}:{column}")
        return out

    def check(self, item_id: str, values: np.ndarray) -> str | None:
        """Why `values` (named `item_id`) must be left out, or None when it may be trained on."""
        if self.name_pattern is not None and re.search(self.name_pattern, item_id.replace("_", " ").replace("/", " ")):
            return f"named like an evaluation benchmark ({self.name_pattern})"
        if not self.benchmarks:
            return None
        hashes = self._hashes
        for h in _window_hashes(values, self.block, self.block).tolist():
            if h in hashes:
                return f"shares a normalised {self.block}-point window with {hashes[h]}"
        return None

    def screen(self, item_id: str, values: np.ndarray) -> tuple[list[tuple[int, int]], dict | None]:
        """The ``[start, stop)`` pieces of ``values`` that may be trained on, and the manifest's record of what was
        left out (None when nothing was): the whole series, or nothing when ``check`` excludes it, or what remains
        around the GIFT-Eval test windows it holds."""
        reason = self.check(item_id, values)
        if reason is not None:
            return [], {"item_id": item_id, "reason": reason}
        if not self.gift_eval:
            return [(0, len(values))], None
        from data_prep.gift_leakage import test_windows_index

        return test_windows_index(self.gift_eval, self.index_dir).screen(item_id, values)


def default_guard(benchmarks: tuple[str, ...] = (), gift_eval: tuple[str, ...] = ()) -> LeakageGuard:
    """The ETT name rule, and by content the shipped ETTh1 (when this is a checkout) plus ``benchmarks``, and the
    test windows of the GIFT-Eval data directories ``gift_eval``."""
    shipped = [str(SHIPPED_ETTH1)] if SHIPPED_ETTH1.is_file() else []
    # Resolved, so that the shipped file named again (or by another relative path) is hashed once.
    resolved = lambda paths: tuple(dict.fromkeys(str(Path(p).resolve()) for p in paths))  # noqa: E731
    return LeakageGuard(resolved([*shipped, *benchmarks]), gift_eval=resolved(gift_eval))


NO_GUARD = LeakageGuard(name_pattern=None)
