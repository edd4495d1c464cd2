"""The prepared corpus on disk: `manifest.json` plus Arrow IPC shards, read through memory maps.

`ShardStore` checks every shard against the manifest (schema, rows, points, optionally SHA-256) and builds a flat
per-sequence index (where its points live, its length, domain and dataset). The points themselves stay in the page
cache: a sequence is a zero-copy numpy view into its shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.shards import SCHEMA, read_shard

from .errors import DataError
from .manifest import read_manifest


def _one_line(schema: pa.Schema) -> str:
    return "; ".join(str(schema).splitlines())


def _read_table(path: Path) -> pa.Table:
    """The shard as a table whose buffers point into the memory map."""
    try:
        table = read_shard(path)
    except (pa.ArrowInvalid, OSError) as e:
        size = f"{path.stat().st_size} bytes" if path.exists() else "missing"
        raise DataError(path, "file", size, f"not a readable Arrow IPC shard: truncated or corrupt ({e})") from None
    if not table.schema.equals(SCHEMA):
        raise DataError(path, "schema", _one_line(table.schema), f"expected timemoe-prep's {_one_line(SCHEMA)}")
    return table


def _codes(path: Path, column: pa.ChunkedArray, names: list[str], field: str) -> np.ndarray:
    codes = pc.index_in(column, value_set=pa.array(names, pa.string()))
    if codes.null_count:
        unknown = pc.filter(column, pc.is_null(codes))[0].as_py()
        raise DataError(path, field, unknown, f"not listed in the manifest ({names})")
    return codes.to_numpy(zero_copy_only=False).astype(np.int32)


class ShardStore:
    """All sequences of a prepared corpus. Index arrays are per sequence (suffix _S); domain_S and dataset_S index
    the sorted names of the manifest's domains and "<domain>/<dataset>" keys."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.manifest = read_manifest(path)
        if verify:
            self.manifest.verify()
        self.domain_names = sorted(self.manifest.domains)
        self.dataset_names = sorted(self.manifest.datasets)
        self._chunks: list[np.ndarray] | None = None
        self._build_index()

    def _tables(self):
        for shard in self.manifest.shards:
            yield shard, _read_table(shard.path)

    def _build_index(self) -> None:
        chunk_S, start_S, length_S, domain_S, dataset_S, chunks = [], [], [], [], [], []
        shards = self.manifest.shards
        for shard, table in tqdm(self._tables(), total=len(shards), desc="indexing shards", unit="shard",
                                 disable=True if len(shards) < 64 else None):
            path = shard.path
            target = table["target"]
            offsets = [c.offsets.to_numpy().astype(np.int64) for c in target.chunks]
            points = sum(int(o[-1] - o[0]) for o in offsets)
            if table.num_rows != shard.rows or points != shard.points:
                raise DataError(path, "rows/points", (table.num_rows, points),
                                f"the manifest lists ({shard.rows}, {shard.points}); the shard is truncated or stale")
            for c, offsets_R in zip(target.chunks, offsets):
                chunk_S.append(np.full(len(c), len(chunks), dtype=np.int32))
                start_S.append(offsets_R[:-1])
                length_S.append(np.diff(offsets_R))
                chunks.append(c.values.to_numpy(zero_copy_only=True))
            domain_S.append(_codes(path, table["domain"], self.domain_names, "domain"))
            keys = pc.binary_join_element_wise(table["domain"], table["dataset"], "/")  # the manifest's dataset keys
            dataset_S.append(_codes(path, keys, self.dataset_names, "domain/dataset"))

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        self.chunk_S = cat(chunk_S, np.int32)
        self.start_S = cat(start_S, np.int64)
        self.length_S = cat(length_S, np.int64)
        self.domain_S = cat(domain_S, np.int32)
        self.dataset_S = cat(dataset_S, np.int32)
        self._chunks = chunks

    def __len__(self) -> int:
        return len(self.length_S)

    def sequence(self, s: int) -> np.ndarray:
        """The points of sequence s: a read-only float32 view into the memory-mapped shard."""
        if self._chunks is None:
            self._chunks = [c.values.to_numpy(zero_copy_only=True)
                            for _, table in self._tables() for c in table["target"].chunks]
        start = self.start_S[s]
        return self._chunks[self.chunk_S[s]][start:start + self.length_S[s]]

    def __getstate__(self):
        # Spawned workers re-map the shards instead of receiving a pickled copy of every point.
        state = dict(self.__dict__)
        state["_chunks"] = None
        return state
