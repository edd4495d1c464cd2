"""The sample plan: everything about the stream fixed by (corpus manifest, data config): the per-sequence index
and statistics, every group's windows and packing bins. Built once (`compute_plan`), cached in one file
(`plan_cache.py`) and memory-mapped by every rank and loader worker; batches are then read off it.

What is not in the plan (mixture weights, temperature and block, how pieces are normalised) is applied when batches
are made, so changing it reuses the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.moments import sequence_moments
from data_prep.shards import read_stats

from .config import DataConfig
from .errors import DataError
from .corpus import Manifest
from .plan_file import PlanFileError, read_plan_file
from .shards import chunk_values, open_shard, scan_shards
from .windows import GROUP_ARRAYS, cut_group

log = logging.getLogger(__name__)

# Bump whenever what compute_plan produces changes: every cached plan is then rebuilt.
PLAN_FORMAT = 1
# The DataConfig fields the plan depends on.
PLAN_FIELDS = ("max_length", "window_mode", "window_stride", "packing", "mixture_by", "seed", "holdout_points")


def needs_statistics(cfg: DataConfig) -> bool:
    return cfg.normalization == "sequence"


def plan_identity(manifest: Manifest, cfg: DataConfig) -> dict:
    """Everything the plan is a function of; its hash is the cache key."""
    return {
        "format": PLAN_FORMAT,
        "config": {f: getattr(cfg, f) for f in PLAN_FIELDS} | {"statistics": needs_statistics(cfg)},
        "domains": sorted(manifest.domains),
        "datasets": sorted(manifest.datasets),
        "shards": [[s.path.name, s.rows, s.points, s.bytes, s.sha256, (s.stats or {}).get("sha256")]
                   for s in manifest.shards],
    }


def plan_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    key: str
    meta: dict  # group_names, and per group the [lo, hi) slice of each of its arrays
    arrays: dict[str, np.ndarray]
    path: Path | None = None  # the file the arrays are mapped from; None: built in this process

    def group(self, g: int) -> dict[str, np.ndarray]:
        return {name: self.arrays[name][lo:hi] for name, (lo, hi) in self.meta["groups"][g].items()}

    def __getstate__(self):
        # A spawned worker maps the file again rather than receiving a copy of every array.
        return {**self.__dict__, "arrays": None} if self.path else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.arrays is None:
            try:
                self.meta, self.arrays = read_plan_file(self.path, self.key)
            except PlanFileError as e:
                raise DataError(self.path, "plan file", self.key[:16], f"{e} (replaced while training?)") from None


def _prep_statistics(manifest: Manifest) -> np.ndarray:
    parts = []
    for shard in manifest.shards:
        path = shard.path.parent / shard.stats["file"]
        stats = read_stats(path)
        if stats.shape != (shard.rows, 2):
            raise DataError(path, "shape", stats.shape, f"expected ({shard.rows}, 2): one (mean, std) per row")
        parts.append(stats)
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def sequence_statistics(manifest: Manifest, index: dict[str, np.ndarray], holdout: int) -> np.ndarray:
    """[S, 2] float64 (mean, std) of what is trained of every sequence (all of it but the last `holdout` points):
    timemoe-prep's when it stored them and nothing is held out, else computed now from the points."""
    if holdout == 0 and all(s.stats for s in manifest.shards):
        return _prep_statistics(manifest)
    if holdout == 0:
        log.warning("%s: prepared without per-sequence statistics (an older timemoe-prep); computing them once, "
                    "which reads every point", manifest.path)
    stats_S2 = np.zeros((len(index["length_S"]), 2))
    stats_S2[:, 1] = 1.0
    first_C1 = np.searchsorted(index["chunk_S"], np.arange(len(index["chunk_shard_C"]) + 1))
    readers = {}
    for c in tqdm(range(len(first_C1) - 1), desc="sequence statistics", unit="chunk",
                  disable=True if len(first_C1) < 64 else None):
        k = int(index["chunk_shard_C"][c])
        if k not in readers:
            readers.clear()  # one shard at a time
            readers[k] = open_shard(manifest.shards[k].path, manifest.shards[k].bytes)
        values, offsets_R1 = chunk_values(readers[k], int(index["chunk_batch_C"][c]))
        trained_R = np.maximum(np.diff(offsets_R1) - holdout, 0)
        if holdout:
            ends_R = np.cumsum(trained_R)
            values = values[np.repeat(offsets_R1[:-1] - (ends_R - trained_R), trained_R) + np.arange(trained_R.sum())]
            offsets_R1 = np.concatenate([[0], ends_R])
        mean_R, std_R = sequence_moments(values, offsets_R1)
        stats_S2[first_C1[c]:first_C1[c + 1]] = np.stack([mean_R, std_R], axis=1)
    return stats_S2


def plan_parts(manifest: Manifest, cfg: DataConfig) -> tuple[str, dict, dict[str, np.ndarray | list[np.ndarray]]]:
    """(key, meta, arrays) of the plan, arrays possibly in parts (as the plan file writes them)."""
    domain_names, dataset_names = sorted(manifest.domains), sorted(manifest.datasets)
    index = scan_shards(manifest, domain_names, dataset_names)
    by_domain = cfg.mixture_by == "domain"
    group_names = domain_names if by_domain else dataset_names
    group = "domain_S" if by_domain else "dataset_S"
    for name in (group, "length_S", "chunk_S", "chunk_shard_C", "chunk_batch_C"):  # needed whole below
        index[name] = np.concatenate(index[name])
    order_S = np.argsort(index[group], kind="stable")
    bounds = np.searchsorted(index[group][order_S], np.arange(len(group_names) + 1))
    trained_S = index["length_S"] - cfg.holdout_points
    parts = {name: [np.zeros(0, np.int64)] for name in GROUP_ARRAYS}
    sizes = {name: 0 for name in GROUP_ARRAYS}
    groups = []
    for g in range(len(group_names)):
        seqs_S = order_S[bounds[g]:bounds[g + 1]]
        slices = {}
        for name, a in cut_group(g, seqs_S, trained_S[seqs_S], cfg).items():
            parts[name].append(a)
            slices[name] = [sizes[name], sizes[name] + len(a)]
            sizes[name] += len(a)
        groups.append(slices)
    del order_S, trained_S
    arrays = {**index, **parts}
    if needs_statistics(cfg):
        arrays["stats_S2"] = sequence_statistics(manifest, index, cfg.holdout_points)
    return plan_key(plan_identity(manifest, cfg)), {"group_names": group_names, "groups": groups}, arrays


def compute_plan(manifest: Manifest, cfg: DataConfig) -> Plan:
    """The plan, built in memory (the cache writes plan_parts to its file instead)."""
    key, meta, arrays = plan_parts(manifest, cfg)
    return Plan(key, meta, {name: np.concatenate(a) if isinstance(a, list) else a for name, a in arrays.items()})
