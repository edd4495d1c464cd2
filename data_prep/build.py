"""Building one shard: read its slices through memory maps, clean them batch by batch, write, record its stats.

Runs in a worker process. Its result is also saved as ``<work>/shards/NNNNN.json`` right after the shard is
renamed into place; a resumed job keeps a shard when that record exists and the shard's sha256 still matches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.clean import CleanOptions, add_counts, clean_batch, new_counts
from data_prep.errors import PrepError
from data_prep.index import DatasetReader, IndexedDataset
from data_prep.moments import sequence_moments
from data_prep.shard_plan import ShardPlan
from data_prep.shards import ShardWriter, make_batch, sha256_file, shard_name, stats_name, write_stats

MAX_LIST_POINTS = 2**31 - 1  # list<float32> offsets are int32


def sidecar_path(work: Path, index: int) -> Path:
    return work / "shards" / f"{index:05d}.json"


def _dataset_stats() -> dict[str, Any]:
    return {"sequences": 0, "points": 0, "input_sequences": 0, "input_points": 0, "cleaning": new_counts()}


def _batches(length: np.ndarray, start: int, batch_points: int):
    """Consecutive [a, b) sequence ranges of at most batch_points points (at least one sequence each)."""
    cum = np.cumsum(length)
    a = 0
    while a < length.size:
        base = int(cum[a - 1]) if a else 0
        b = max(int(np.searchsorted(cum, base + batch_points, side="right")), a + 1)
        yield start + a, start + b
        a = b


def build_shard(
    plan: ShardPlan,
    datasets: list[IndexedDataset],
    out_dir: Path,
    work: Path,
    shard_count: int,
    clean: CleanOptions,
    batch_points: int,
) -> dict[str, Any]:
    name = shard_name(plan.index, shard_count)
    writer = ShardWriter(out_dir / name)
    per_dataset: dict[str, dict[str, Any]] = {}
    rows = points = 0
    means, stds = [], []
    try:
        for sl in plan.slices:
            ds = datasets[sl.dataset]
            reader = DatasetReader(ds)
            stats = per_dataset.setdefault(ds.key, _dataset_stats())
            for a, b in _batches(np.asarray(reader.length[sl.start : sl.stop]), sl.start, batch_points):
                values, length = reader.read(a, b)
                if length.max(initial=0) > MAX_LIST_POINTS:
                    raise PrepError(ds.folder, "length", int(length.max()), "one sequence exceeds 2**31-1 points")
                stats["input_sequences"] += int(length.size)
                stats["input_points"] += int(length.sum())
                values, length, ids, counts = clean_batch(values, length, reader.item_ids(a, b), clean)
                add_counts(stats["cleaning"], counts)
                if length.size:
                    values = np.asarray(values, dtype=np.float32)  # the statistics are of the points as stored
                    writer.write(make_batch(ids, ds.domain, ds.dataset, ds.freq, values, length))
                    mean, std = sequence_moments(values, np.concatenate([[0], np.cumsum(length)]))
                    means.append(mean)
                    stds.append(std)
                stats["sequences"] += int(length.size)
                stats["points"] += int(length.sum())
                rows += int(length.size)
                points += int(length.sum())
        size, digest = writer.commit()
    except BaseException:
        writer.abort()
        raise
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    stats_size, stats_digest = write_stats(out_dir / stats_name(name), cat(means), cat(stds))
    result = {"file": name, "rows": rows, "points": points, "bytes": size, "sha256": digest, "datasets": per_dataset,
              "stats": {"file": stats_name(name), "bytes": stats_size, "sha256": stats_digest}}
    sidecar = sidecar_path(work, plan.index)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, sidecar)
    return result


def finished_shard(out_dir: Path, work: Path, index: int, shard_count: int) -> dict[str, Any] | None:
    """The recorded stats of a shard an earlier run completed and that is still intact, or None to (re)build it."""
    sidecar = sidecar_path(work, index)
    shard = out_dir / shard_name(index, shard_count)
    if not sidecar.exists() or not shard.exists():
        return None
    try:
        result = json.loads(sidecar.read_text())
    except json.JSONDecodeError:  # torn by a machine crash
        return None
    if shard.stat().st_size != result["bytes"] or sha256_file(shard) != result["sha256"]:
        return None
    stats = result.get("stats")
    stats_file = out_dir / stats["file"] if stats else None
    if stats_file is None or not stats_file.is_file() or sha256_file(stats_file) != stats["sha256"]:
        return None  # written by an older timemoe-prep, or lost
    return result
