"""The shard file format: schema, atomic writer, memory-mapped reader.

Shards are Arrow IPC **file** format (random access to record batches through the footer), uncompressed so that
``pa.memory_map`` + ``pa.ipc.open_file`` reads them without copying, and ``datasets.load_dataset("arrow",
data_files=...)`` loads them as they are. Columns (see ``SCHEMA``): ``item_id``, ``domain``, ``dataset`` (strings),
``freq`` (string, null when unknown) and ``target`` (``list<float32>``). A shard holds several record batches of at
most ``batch_points`` points each (one sequence longer than that gets a batch of its own).

Beside each shard, ``<shard>.stats.npy`` holds every row's float64 (mean, std) (``data_prep.moments``), so that the
loader never re-reads a series for its statistics; the manifest lists its size and sha256 with the shard's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("freq", pa.string()),
        pa.field("target", pa.list_(pa.float32()), nullable=False),
    ]
)
TMP_SUFFIX = ".partial"
_HASH_CHUNK = 16 << 20


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.arrow"


def make_batch(
    ids: list[str], domain: str, dataset: str, freq: str | None, values: np.ndarray, lengths: np.ndarray
) -> pa.RecordBatch:
    n = len(ids)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    target = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([domain] * n, pa.string()),
            pa.array([dataset] * n, pa.string()),
            pa.array([freq] * n, pa.string()),
            target,
        ],
        schema=SCHEMA,
    )


def stats_name(shard: str) -> str:
    return shard + ".stats.npy"


def write_stats(path: Path, mean_S: np.ndarray, std_S: np.ndarray) -> tuple[int, str]:
    """``[rows, 2]`` float64 (mean, std) written atomically; returns its size and sha256."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        np.save(f, np.stack([mean_S, std_S], axis=1).astype("<f8"))
    os.replace(tmp, path)
    return path.stat().st_size, sha256_file(path)


def read_stats(path: str | Path) -> np.ndarray:
    """The ``[rows, 2]`` (mean, std) of a shard, memory-mapped."""
    return np.load(path, mmap_mode="r")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes batches to ``<name>.partial`` and renames it to ``<name>`` only once complete.

    A killed job therefore leaves either a whole shard or a ``.partial`` file that the next run deletes; a reader
    never sees half a shard. There is deliberately no fsync (it made the job disk-bound at a fraction of the page
    cache's speed): what a crash of the machine itself could leave behind is caught when a job resumes, since it
    re-hashes every shard it keeps and rebuilds those whose sha256 differs from the one recorded at commit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + TMP_SUFFIX)
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def commit(self) -> tuple[int, str]:
        """Finish the file and move it into place; returns its size and sha256."""
        self._writer.close()
        self._sink.close()
        digest = sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return size, digest

    def abort(self) -> None:
        self._writer.close()
        self._sink.close()
        self.tmp.unlink(missing_ok=True)


def read_shard(path: str | Path) -> pa.Table:
    """A shard as a table backed by a memory map: nothing is read until a column is touched."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
