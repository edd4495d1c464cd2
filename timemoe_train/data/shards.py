"""The prepared corpus on disk: `manifest.json` plus Arrow IPC shards, read through memory maps.

`scan_shards` (run once, when the plan is built) checks every shard against the manifest (schema, rows, points) and
makes the flat per-sequence index: where its points live, its length, domain and dataset. `ShardStore` reads a
sequence through that index (memory-mapped from the plan file): a zero-copy numpy view into its shard, which is
opened on first use, so a rank's start-up does not grow with the corpus.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.shards import SCHEMA

from .errors import DataError
from .corpus import Manifest

# Open shards and mapped record batches a process keeps (least recently used go): bounded file descriptors and
# Python objects however many shards a corpus has.
_OPEN_SHARDS, _OPEN_CHUNKS = 64, 1024

# The per-sequence (_S) and per-chunk (_C; a chunk is one record batch of a shard) arrays of the index.
INDEX_ARRAYS = ("chunk_S", "start_S", "length_S", "domain_S", "dataset_S", "chunk_shard_C", "chunk_batch_C")


def _one_line(schema: pa.Schema) -> str:
    return "; ".join(str(schema).splitlines())


def open_shard(path: Path, expected_bytes: int) -> pa.ipc.RecordBatchFileReader:
    """A shard's reader over a memory map; its buffers are read only when touched."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as e:
        size = f"{path.stat().st_size} bytes" if path.exists() else "missing"
        raise DataError(path, "file", size, f"not a readable Arrow IPC shard: truncated or corrupt ({e})") from None
    if not reader.schema.equals(SCHEMA):
        raise DataError(path, "schema", _one_line(reader.schema), f"expected timemoe-prep's {_one_line(SCHEMA)}")
    if path.stat().st_size != expected_bytes:
        raise DataError(path, "bytes", path.stat().st_size, f"the manifest says {expected_bytes}: the shard was "
                        "replaced")
    return reader


def _codes(path: Path, column: pa.Array, names: list[str], field: str) -> np.ndarray:
    codes = pc.index_in(column, value_set=pa.array(names, pa.string()))
    if codes.null_count:
        unknown = pc.filter(column, pc.is_null(codes))[0].as_py()
        raise DataError(path, field, unknown, f"not listed in the manifest ({names})")
    return codes.to_numpy(zero_copy_only=False).astype(np.int32)


def _constant(column: pa.Array) -> str | None:
    """The column's only value, if it has one (timemoe-prep writes one dataset per record batch)."""
    if not len(column) or column.null_count:
        return None
    bounds = pc.min_max(column)
    return bounds["min"].as_py() if bounds["min"] == bounds["max"] else None


def _group_codes(path: Path, batch: pa.RecordBatch, domain_names: list[str], dataset_names: list[str]):
    """(domain_R, dataset_R) codes of a record batch's rows."""
    domain, dataset = _constant(batch.column("domain")), _constant(batch.column("dataset"))
    if domain in domain_names and f"{domain}/{dataset}" in dataset_names:  # no per-row lookup
        return (np.full(batch.num_rows, domain_names.index(domain), dtype=np.int32),
                np.full(batch.num_rows, dataset_names.index(f"{domain}/{dataset}"), dtype=np.int32))
    keys = pc.binary_join_element_wise(batch.column("domain"), batch.column("dataset"), "/")
    return (_codes(path, batch.column("domain"), domain_names, "domain"),
            _codes(path, keys, dataset_names, "domain/dataset"))


def chunk_values(reader: pa.ipc.RecordBatchFileReader, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(points, offsets) of one record batch: a float32 view into the shard and the rows' int64 offsets."""
    target = reader.get_batch(batch).column("target")
    return target.values.to_numpy(zero_copy_only=True), target.offsets.to_numpy().astype(np.int64)


def scan_shards(manifest: Manifest, domain_names: list[str], dataset_names: list[str]) -> dict[str, list[np.ndarray]]:
    """The index (INDEX_ARRAYS) of every sequence, each array in parts (one per record batch); domain_S and
    dataset_S index the sorted names."""
    parts = {name: [] for name in INDEX_ARRAYS}
    shards, chunk = manifest.shards, 0
    for k, shard in enumerate(tqdm(shards, desc="indexing shards", unit="shard",
                                   disable=True if len(shards) < 64 else None)):
        reader = open_shard(shard.path, shard.bytes)
        rows = points = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            offsets_R = batch.column("target").offsets.to_numpy().astype(np.int64)
            parts["chunk_S"].append(np.full(batch.num_rows, chunk, dtype=np.int32))
            parts["start_S"].append(offsets_R[:-1])
            parts["length_S"].append(np.diff(offsets_R))
            domain_R, dataset_R = _group_codes(shard.path, batch, domain_names, dataset_names)
            parts["domain_S"].append(domain_R)
            parts["dataset_S"].append(dataset_R)
            parts["chunk_shard_C"].append(np.array([k], dtype=np.int32))
            parts["chunk_batch_C"].append(np.array([i], dtype=np.int32))
            chunk += 1
            rows += batch.num_rows
            points += int(offsets_R[-1] - offsets_R[0]) if len(offsets_R) else 0
        if rows != shard.rows or points != shard.points:
            raise DataError(shard.path, "rows/points", (rows, points),
                            f"the manifest lists ({shard.rows}, {shard.points}); the shard is truncated or stale")
    dtypes = {"start_S": np.int64, "length_S": np.int64}
    # Left in parts: the plan file writes them one after another, without a joined copy in memory.
    return {name: [np.zeros(0, dtypes.get(name, np.int32))] + p for name, p in parts.items()}


class ShardStore:
    """All sequences of a prepared corpus, through the index arrays of the plan."""

    def __init__(self, manifest: Manifest, index: dict[str, np.ndarray]):
        self.manifest = manifest
        self.domain_names = sorted(manifest.domains)
        self.dataset_names = sorted(manifest.datasets)
        for name in INDEX_ARRAYS:
            setattr(self, name, index[name])
        self._readers: OrderedDict[int, pa.ipc.RecordBatchFileReader] = OrderedDict()
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def scan(cls, manifest: Manifest) -> ShardStore:
        """The store with an index made now (what the plan file holds, without one)."""
        parts = scan_shards(manifest, sorted(manifest.domains), sorted(manifest.datasets))
        return cls(manifest, {name: np.concatenate(p) for name, p in parts.items()})

    def __len__(self) -> int:
        return len(self.length_S)

    def _chunk(self, c: int) -> np.ndarray:
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        k = int(self.chunk_shard_C[c])
        if k in self._readers:
            self._readers.move_to_end(k)
        else:
            shard = self.manifest.shards[k]
            self._readers[k] = open_shard(shard.path, shard.bytes)
            if len(self._readers) > _OPEN_SHARDS:
                self._readers.popitem(last=False)
        values = self._chunks[c] = chunk_values(self._readers[k], int(self.chunk_batch_C[c]))[0]
        if len(self._chunks) > _OPEN_CHUNKS:
            self._chunks.popitem(last=False)
        return values

    def sequence(self, s: int) -> np.ndarray:
        """The points of sequence s: a read-only float32 view into the memory-mapped shard."""
        start = int(self.start_S[s])
        return self._chunk(int(self.chunk_S[s]))[start:start + int(self.length_S[s])]

    def locate(self, s: int) -> str:
        """'<shard> row R (item <id>)' of sequence s, for messages about its data."""
        c = int(self.chunk_S[s])
        k = int(self.chunk_shard_C[c])
        row = s - int(np.searchsorted(self.chunk_S, np.searchsorted(self.chunk_shard_C, k)))
        shard = self.manifest.shards[k]
        chunk_row = s - int(np.searchsorted(self.chunk_S, c))
        item = open_shard(shard.path, shard.bytes).get_batch(int(self.chunk_batch_C[c])).column("item_id")[chunk_row]
        return f"{shard.path} row {row} (item {item.as_py()})"

    def __getstate__(self):
        # Spawned workers re-map the shards instead of receiving a pickled copy of every point.
        return {**self.__dict__, "_readers": OrderedDict(), "_chunks": OrderedDict()}
