"""The uniform view every source reduces a dataset to, so one shard builder serves all sources.

A dataset is a chain of *streams* (runs of numbers on disk: a Time-300B ``.bin`` file, the body of a ``.npy`` file,
or a file staged from text input) plus an *index* of its sequences: where each one starts in the chained streams
(``offset``), its ``length``, optionally its ``mean``/``std`` and its ``item_id``. Index arrays are ``.npy`` files so
that shard workers memory-map them instead of re-parsing a multi-gigabyte ``meta.json`` per shard.

On disk, under the job's work folder, a dataset is a folder ``NNNNN/`` holding ``offset.npy``, ``length.npy``, the
optional ``mean.npy``, ``std.npy``, ``item_id.npy``, staged ``values.bin`` and ``dataset.json``, written last, whose
presence marks the folder complete (so a resumed job reuses it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import PrepError
from data_prep.leakage import LeakageGuard

COMPLETE_MARKER = "dataset.json"
STAGED_DTYPE = "<f8"  # text input is staged in float64 so interpolation sees the values the user wrote


@dataclass(frozen=True)
class Stream:
    path: str
    byte_offset: int  # where the numbers begin (a .npy header comes first)
    dtype: str  # numpy dtype string, e.g. "<f4"
    points: int


@dataclass(frozen=True)
class IndexedDataset:
    domain: str
    dataset: str
    freq: str | None
    streams: tuple[Stream, ...]
    folder: str  # where the index arrays live
    sequences: int
    points: int
    has_scales: bool
    has_ids: bool
    # Series the leakage guard left out: [{"item_id", "reason"}] (see ``data_prep.leakage``).
    excluded: tuple[dict[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.dataset}"

    def save(self) -> None:
        record = asdict(self)
        _atomic_write_text(Path(self.folder) / COMPLETE_MARKER, json.dumps(record, indent=1))

    @classmethod
    def load(cls, folder: Path) -> IndexedDataset | None:
        marker = folder / COMPLETE_MARKER
        if not marker.exists():
            return None
        record = json.loads(marker.read_text())
        record["streams"] = tuple(Stream(**s) for s in record["streams"])
        return cls(**record)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_array(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", array, allow_pickle=False)


def write_index(
    folder: Path,
    *,
    domain: str,
    dataset: str,
    freq: str | None,
    streams: list[Stream],
    offset: np.ndarray,
    length: np.ndarray,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    item_id: list[str] | None = None,
    excluded: tuple[dict[str, str], ...] = (),
) -> IndexedDataset:
    """Write the index arrays, then the completion marker; returns the dataset's description."""
    folder.mkdir(parents=True, exist_ok=True)
    save_array(folder, "offset", np.asarray(offset, dtype=np.int64))
    save_array(folder, "length", np.asarray(length, dtype=np.int64))
    if mean is not None:
        save_array(folder, "mean", np.asarray(mean, dtype=np.float64))
        save_array(folder, "std", np.asarray(std, dtype=np.float64))
    if item_id is not None:
        save_array(folder, "item_id", np.asarray(item_id, dtype=np.str_))
    ds = IndexedDataset(
        domain=domain,
        dataset=dataset,
        freq=freq,
        streams=tuple(streams),
        folder=str(folder),
        sequences=int(len(length)),
        points=int(np.sum(length, dtype=np.int64)),
        has_scales=mean is not None,
        has_ids=item_id is not None,
        excluded=tuple(excluded),
    )
    ds.save()
    return ds


class Stager:
    """Collects series parsed from text input into ``values.bin`` plus an index; ``finish`` makes them a dataset."""

    def __init__(self, folder: Path, domain: str, dataset: str, guard: LeakageGuard) -> None:
        self.folder, self.domain, self.dataset, self.guard = folder, domain, dataset, guard
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / "values.bin"
        self._file = open(self._path, "wb")
        self._lengths: list[int] = []
        self._ids: list[str] = []
        self._excluded: list[dict[str, str]] = []

    def add(self, item_id: str, values: np.ndarray) -> None:
        """Append one series, or what the guard keeps of it; its id is prefixed with ``domain/dataset/`` so ids are
        unique across the corpus, and a piece left by a cut gets ``@<start>`` as cleaning's splits do."""
        full_id = f"{self.domain}/{self.dataset}/{item_id}"
        kept, record = self.guard.screen(full_id, values)
        if record is not None:
            self._excluded.append(record)
        for start, stop in kept:
            self._file.write(np.ascontiguousarray(values[start:stop], dtype=STAGED_DTYPE).tobytes())
            self._lengths.append(stop - start)
            self._ids.append(piece_id(full_id, start, stop, values.size))

    def add_all(self, series: Iterable[tuple[str, np.ndarray]]) -> None:
        for item_id, values in series:
            self.add(item_id, values)

    def finish(self, freq: str | None) -> IndexedDataset:
        self._file.close()
        length = np.array(self._lengths, dtype=np.int64)
        stream = Stream(str(self._path), 0, STAGED_DTYPE, int(length.sum()))
        return write_index(
            self.folder,
            domain=self.domain,
            dataset=self.dataset,
            freq=freq,
            streams=[stream],
            offset=np.cumsum(length) - length,
            length=length,
            item_id=self._ids,
            excluded=tuple(self._excluded),
        )

    def abort(self) -> None:
        self._file.close()


def piece_id(item_id: str, start: int, stop: int, length: int) -> str:
    return item_id if (start, stop) == (0, length) else f"{item_id}@{start}"


SCREEN_CHUNK = 1 << 16


def screen_index(ds: IndexedDataset, guard: LeakageGuard) -> IndexedDataset:
    """``ds`` less the series ``guard`` excludes, for datasets indexed in place (their numbers are read here, through
    memory maps); ``ds`` itself when none is. Normalised values serve: the guard's match is blind to scale."""
    if not guard.active:  # nothing to exclude: skip reading the whole dataset once more
        return ds
    reader = DatasetReader(ds)
    excluded = []
    cut: dict[int, list[tuple[int, int]]] = {}  # sequence -> the pieces the guard keeps of it, where it cut
    for a in range(0, ds.sequences, SCREEN_CHUNK):  # in chunks: a Time-300B folder may hold millions of sequences
        b = min(a + SCREEN_CHUNK, ds.sequences)
        spans = zip(reader.item_ids(a, b), reader.offset[a:b].tolist(), reader.length[a:b].tolist())
        for i, (item_id, start, n) in enumerate(spans, start=a):
            kept, record = guard.screen(item_id, reader.read_span(start, start + n))
            if record is not None:
                cut[i] = kept
                excluded.append(record)
    if not excluded:
        return ds
    folder = Path(ds.folder)
    ids = reader.item_ids(0, ds.sequences)
    # Each sequence becomes its pieces (itself when untouched); ids are kept, not renumbered.
    pieces = [(i, a, b) for i, n in enumerate(reader.length.tolist()) for a, b in cut.get(i, [(0, n)])]
    seq = np.array([i for i, _, _ in pieces], dtype=np.int64)
    start = np.array([a for _, a, _ in pieces], dtype=np.int64)
    stop = np.array([b for _, _, b in pieces], dtype=np.int64)
    (folder / COMPLETE_MARKER).unlink()  # incomplete until rewritten: a resumed job indexes it again
    return write_index(
        folder,
        domain=ds.domain,
        dataset=ds.dataset,
        freq=ds.freq,
        streams=list(ds.streams),
        offset=np.asarray(reader.offset)[seq] + start,
        length=stop - start,
        mean=None if reader.mean is None else np.asarray(reader.mean)[seq],
        std=None if reader.std is None else np.asarray(reader.std)[seq],
        item_id=[piece_id(ids[i], a, b, int(reader.length[i])) for i, a, b in pieces],
        excluded=tuple(excluded),
    )


LOOP_MIN_MEAN_LENGTH = 256


def _denormalize(values: np.ndarray, length: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """original = value * std + mean, in float64 (rounded to float32 once, after cleaning).

    Expanding mean/std to one entry per point (np.repeat) was the single largest cost of a whole job; for long
    sequences a loop of in-place slice updates is several times cheaper, for very short ones the expansion wins.
    """
    values = values.astype(np.float64)
    if length.size and length.sum() >= LOOP_MIN_MEAN_LENGTH * length.size:
        start = 0
        for n, m, s in zip(length.tolist(), mean.tolist(), std.tolist()):
            segment = values[start : start + n]
            segment *= s
            segment += m
            start += n
    else:
        values *= np.repeat(std, length)
        values += np.repeat(mean, length)
    return values


class DatasetReader:
    """Reads sequences of one indexed dataset through memory maps (a whole 4 GB ``.bin`` is never loaded)."""

    def __init__(self, ds: IndexedDataset) -> None:
        self.ds = ds
        folder = Path(ds.folder)
        self.offset = np.load(folder / "offset.npy", mmap_mode="r")
        self.length = np.load(folder / "length.npy", mmap_mode="r")
        self.mean = np.load(folder / "mean.npy", mmap_mode="r") if ds.has_scales else None
        self.std = np.load(folder / "std.npy", mmap_mode="r") if ds.has_scales else None
        self.item_id = np.load(folder / "item_id.npy", mmap_mode="r") if ds.has_ids else None
        self._stream_start = np.cumsum([0] + [s.points for s in ds.streams])
        self._maps: list[np.ndarray | None] = [None] * len(ds.streams)

    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            s = self.ds.streams[i]
            # The file may have changed since indexing; mapping past its end would crash the worker with SIGBUS.
            need = s.byte_offset + s.points * np.dtype(s.dtype).itemsize
            have = os.path.getsize(s.path)
            if have < need:
                raise PrepError(s.path, "size", have, f"changed since indexing: needs at least {need} bytes")
            self._maps[i] = (
                np.memmap(s.path, dtype=s.dtype, mode="r", offset=s.byte_offset, shape=(s.points,))
                if s.points
                else np.empty(0, dtype=s.dtype)
            )
        return self._maps[i]

    def read_span(self, start: int, stop: int) -> np.ndarray:
        """Points [start, stop) of the chained streams; a view when they lie in one file, a copy when they straddle."""
        first = int(np.searchsorted(self._stream_start, start, side="right")) - 1
        parts = []
        i = first
        while start < stop:
            lo = start - self._stream_start[i]
            hi = min(stop, self._stream_start[i + 1]) - self._stream_start[i]
            parts.append(self._map(i)[lo:hi])
            start += hi - lo
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def item_ids(self, start: int, stop: int) -> list[str]:
        if self.item_id is not None:
            return self.item_id[start:stop].tolist()
        prefix = self.ds.key
        return [f"{prefix}/{i}" for i in range(start, stop)]

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequences [start, stop): their concatenated points (de-normalised when scales exist) and lengths."""
        offset = np.asarray(self.offset[start:stop])
        length = np.asarray(self.length[start:stop])
        if length.size and np.array_equal(offset[1:], offset[:-1] + length[:-1]):
            values = self.read_span(int(offset[0]), int(offset[-1] + length[-1]))
        else:
            values = np.concatenate(
                [self.read_span(int(o), int(o + n)) for o, n in zip(offset, length)] or [np.empty(0, np.float32)]
            )
        if self.mean is not None:
            values = _denormalize(values, length, self.mean[start:stop], self.std[start:stop])
        elif values.dtype.kind != "f" or values.dtype.itemsize < 4:
            values = values.astype(np.float64)
        return values, length
