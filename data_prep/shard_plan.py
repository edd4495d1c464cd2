"""Cutting the corpus into shards before any point is read.

Shard boundaries are a function of the dataset indexes alone (sequence lengths, in corpus order), never of the
worker count or of timing: that is what makes the output byte-identical for any ``--workers`` and lets each shard be
built, skipped on resume or retried on its own. The target size counts points before cleaning (4 bytes each) plus a
per-row allowance; cleaning only removes points, so shards come out at or below it. A sequence larger than the target
gets a shard of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.index import IndexedDataset

ROW_BYTES = 64  # offsets, ids and labels of one row, roughly


@dataclass(frozen=True)
class Slice:
    dataset: int  # position in the corpus's dataset list
    start: int  # first sequence
    stop: int  # one past the last sequence


@dataclass(frozen=True)
class ShardPlan:
    index: int
    slices: tuple[Slice, ...]
    sequences: int
    points: int


def plan_shards(datasets: list[IndexedDataset], target_bytes: int) -> list[ShardPlan]:
    plans: list[ShardPlan] = []
    slices: list[Slice] = []
    used = sequences = points = 0

    def close() -> None:
        nonlocal slices, used, sequences, points
        plans.append(ShardPlan(len(plans), tuple(slices), sequences, points))
        slices, used, sequences, points = [], 0, 0, 0

    for d, ds in enumerate(datasets):
        if ds.sequences == 0:
            continue
        length = np.load(Path(ds.folder) / "length.npy", mmap_mode="r")
        cost = np.cumsum(length * 4 + ROW_BYTES)
        start = 0
        while start < ds.sequences:
            base = int(cost[start - 1]) if start else 0
            stop = int(np.searchsorted(cost, base + target_bytes - used, side="right"))
            if stop == start:
                if slices:
                    close()
                    continue
                stop = start + 1  # one sequence larger than a whole shard
            slices.append(Slice(d, start, stop))
            used += int(cost[stop - 1]) - base
            sequences += stop - start
            points += int(np.sum(length[start:stop], dtype=np.int64))
            start = stop
    if slices:
        close()
    return plans
