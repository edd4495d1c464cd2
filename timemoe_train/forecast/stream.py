"""What `timemoe-forecast --out FOLDER/` reads: the input cut into sources (a prepared corpus' Arrow shards, the
files of a folder, or the one file given) and each source into parts of at most `series_per_shard` series, read
one part at a time, so that memory is set by a part and not by the input.

- a corpus shard, and a Parquet or Arrow file of one row per series (a list column `target`, as prep reads
  them): its row count is known before reading, so its parts are known, and any one of them is read alone (record
  batches of a memory map, Parquet row groups);
- any other table (wide or long CSV, Parquet or Arrow) is read whole by `inputs.read_table` (timemoe-prep's reader,
  its errors), one file at a time, then cut into parts.

Each part's contexts (the last `context_length` points of each series) are gathered in one vectorised step from
the Arrow list column; only a series with missing points goes through `inputs.finite_tail` on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.corpus_manifest import MANIFEST_NAME
from data_prep.errors import PrepError
from data_prep.sources.tabular import SUFFIXES, TableLayout

from .batched import Contexts
from .inputs import finite_tail, not_a_table, read_table, table_kind
from .model import ForecastError


@dataclass(frozen=True)
class Source:
    """One input shard. kind: "corpus" (a prepared corpus' shard), "nested" (Parquet / Arrow IPC, one row per
    series), "table" (read whole); rows: its series, where known before reading it."""

    path: Path
    kind: str
    rows: int | None
    bytes: int | None = None  # a corpus shard's size in its manifest


@dataclass
class Part:
    """Up to `series_per_shard` series of one source, the `index`-th of its `count` parts."""

    source: Source
    index: int
    count: int
    item_id: pa.Array  # strings
    contexts: Contexts
    last_time_N: np.ndarray | None = None  # datetime64[ns] of each series' last point, when forecasts get times
    freq: str | None = None
    filled: int = 0  # missing points inside the contexts, filled linearly
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return part_name(self.source, self.index, self.count)


def part_name(source: Source, index: int, count: int) -> str:
    """The output shard of a part: the input's own name first, so that the outputs sort as their inputs do."""
    return f"{source.path.name}.{index:05d}-of-{count:05d}.parquet"


def part_count(rows: int, series_per_shard: int) -> int:
    return max(1, -(-rows // series_per_shard))


def find_sources(path: str | Path) -> list[Source]:
    """The sources of `--input`, in order; errors name the path."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            from ..data.corpus import read_manifest

            return [Source(s.path, "corpus", s.rows, s.bytes) for s in read_manifest(path).shards]
        suffixes = tuple(s for group in SUFFIXES.values() for s in group)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise ForecastError(f"{path}: a folder given as --input must be a prepared corpus (with {MANIFEST_NAME}) "
                                f"or hold {'/'.join(suffixes)} files; it holds neither")
        return [file_source(f) for f in files]
    if path.is_file():
        return [file_source(path)]
    raise ForecastError(f"{path}: --input not found")


def file_source(path: Path) -> Source:
    kind = table_kind(path)
    if kind is None:
        raise not_a_table(path)
    if path.stat().st_size == 0:
        raise PrepError(path, "file", "", "empty file")
    try:
        if kind == "parquet":
            meta = pq.ParquetFile(path)
            if _nested(meta.schema_arrow):
                return nested_source(path, meta.metadata.num_rows)
        elif kind == "arrow":
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            if _nested(reader.schema):
                return nested_source(path, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)))
    except (pa.ArrowInvalid, OSError):
        pass  # an Arrow stream (Hugging Face datasets) or a broken file: read_table reads it or names the problem
    return Source(path, "table", None)


def nested_source(path: Path, rows: int) -> Source:
    if not rows:
        raise PrepError(path, "rows", 0, "the table has no rows")
    return Source(path, "nested", rows)


def _nested(schema: pa.Schema) -> bool:
    if "target" not in schema.names:
        return False
    kind = schema.field("target").type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def read_parts(source: Source, wanted: Callable[[int, int], bool], series_per_shard: int, context_length: int,
               layout: TableLayout, freq: str | None) -> Iterator[Part]:
    """The parts (index, count) of `source` that `wanted` asks for, in order; a source of known rows reads only
    those."""
    if source.rows is None:
        yield from _table_parts(source, wanted, series_per_shard, context_length, layout, freq)
        return
    count = part_count(source.rows, series_per_shard)
    for index in range(count):
        if wanted(index, count):
            lo, hi = index * series_per_shard, min((index + 1) * series_per_shard, source.rows)
            ids, target = _rows(source, lo, hi)
            contexts, filled = tails(source.path, ids, target, context_length)
            yield Part(source, index, count, ids, contexts, filled=filled)


def _table_parts(source, wanted, series_per_shard, context_length, layout, freq) -> Iterator[Part]:
    inputs = read_table(source.path, layout, freq, context_length)
    n = len(inputs.contexts)
    count = part_count(n, series_per_shard)
    for index in range(count):
        if not wanted(index, count):
            continue
        chosen = inputs.contexts[index * series_per_shard:(index + 1) * series_per_shard]
        last_time_N = None
        if inputs.timestamps:  # prep reads times as UTC; written back without the zone, as most inputs write them
            last_time_N = np.array([c.last_time.tz_convert(None) if c.last_time.tz is not None else c.last_time
                                    for c in chosen], dtype="datetime64[ns]")
        # every part carries the file's notes: a re-run that skips some parts still says them
        yield Part(source, index, count, pa.array([c.item_id for c in chosen], pa.string()),
                   Contexts.of([c.values for c in chosen]), last_time_N, inputs.freq, notes=list(inputs.notes))


def _rows(source: Source, lo: int, hi: int) -> tuple[pa.Array, pa.ListArray]:
    """(item ids, targets) of rows [lo, hi) of a source of known rows, reading only the batches or row groups that
    hold them."""
    if source.kind == "corpus":
        from ..data.shards import open_shard

        reader = open_shard(source.path, source.bytes)
        batches, first = _batches_between(reader.get_batch, reader.num_record_batches, lo, hi)
    elif source.path.suffix.lower() in SUFFIXES["arrow"]:
        reader = pa.ipc.open_file(pa.memory_map(str(source.path)))
        batches, first = _batches_between(reader.get_batch, reader.num_record_batches, lo, hi)
    else:
        pf = pq.ParquetFile(source.path)
        columns = [c for c in ("item_id", "target") if c in pf.schema_arrow.names]
        groups, first, start = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            end = start + pf.metadata.row_group(g).num_rows
            if end > lo and start < hi:
                groups.append(g)
                first = start if first is None else first
            start = end
        batches = pf.read_row_groups(groups, columns=columns).to_batches()
    table = pa.Table.from_batches(batches).slice(lo - first, hi - lo)
    target = table.column("target").combine_chunks()
    if "item_id" in table.column_names:
        ids = table.column("item_id").combine_chunks().cast(pa.string())
    else:  # as prep names the rows of a table without ids
        ids = pa.array(np.arange(lo, hi).astype(str), pa.string())
    return ids, target


def _batches_between(get_batch, num_batches: int, lo: int, hi: int) -> tuple[list[pa.RecordBatch], int]:
    """The record batches holding rows [lo, hi), and the row the first of them starts at (batches of a memory map:
    their values are not read here)."""
    out, first, start = [], 0, 0
    for i in range(num_batches):
        batch = get_batch(i)
        end = start + batch.num_rows
        if end > lo and start < hi:
            first = start if not out else first
            out.append(batch)
        elif start >= hi:
            break
        start = end
    return out, first


def tails(path: Path, ids: pa.Array, target: pa.Array, context_length: int) -> tuple[Contexts, int]:
    """(the last `context_length` points of every row of a list column, points filled). One gather for all rows;
    a row with a missing point in its tail goes through `finite_tail` (trailing gaps dropped, inner ones filled)."""
    value_type = target.type.value_type
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):
        raise PrepError(path, "target", str(target.type), "multivariate targets are not supported; one list per row")
    if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
        raise PrepError(path, "target", str(target.type), "not a list of numbers")
    offsets_N1 = target.offsets.to_numpy().astype(np.int64)
    points_P = target.values.slice(offsets_N1[0], offsets_N1[-1] - offsets_N1[0]).to_numpy(zero_copy_only=False)
    start_N, end_N = offsets_N1[:-1] - offsets_N1[0], offsets_N1[1:] - offsets_N1[0]
    if target.null_count:  # a null row holds no points
        null_N = target.is_null().to_numpy(zero_copy_only=False)
        end_N[null_N] = start_N[null_N]
    tail_start_N = np.maximum(start_N, end_N - context_length)
    length_N = end_N - tail_start_N
    tail_offsets_N1 = np.zeros(len(length_N) + 1, dtype=np.int64)
    np.cumsum(length_N, out=tail_offsets_N1[1:])
    row_P = np.repeat(np.arange(len(length_N)), length_N)
    tail_P = points_P[np.arange(tail_offsets_N1[-1]) - tail_offsets_N1[:-1][row_P] + tail_start_N[row_P]]
    tail_P = tail_P.astype(np.float32, copy=False)
    bad_P = ~np.isfinite(tail_P)
    repair = np.union1d(np.flatnonzero(length_N == 0), row_P[bad_P])
    if not len(repair):
        return Contexts(tail_P, tail_offsets_N1), 0
    rows = [tail_P[tail_offsets_N1[i]:tail_offsets_N1[i + 1]] for i in range(len(length_N))]
    filled = 0
    for i in repair:
        points = points_P[start_N[i]:end_N[i]].astype(np.float64)
        rows[i], _, holes = finite_tail(path, ids[i].as_py(), points, context_length)
        filled += holes
    return Contexts.of(rows), filled
