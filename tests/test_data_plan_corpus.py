"""The corpus and configurations of the golden-stream test (tests/data/stream_golden.npz holds main's batches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_data_shards import write_corpus

GOLDEN_ROWS = np.concatenate([np.arange(48), np.arange(5000, 5016), np.arange(70_000, 70_016)])
GOLDEN_CONFIGS = {
    "default": dict(max_length=24),
    "random": dict(max_length=24, window_mode="random"),
    "unpacked": dict(max_length=24, packing=False),
    "window_norm": dict(max_length=24, normalization="window"),
    "no_norm": dict(max_length=24, normalization="none", stride=10),
    "datasets": dict(max_length=16, mixture_by="dataset", mixture_block=7, mixture_temperature=2.0,
                     mixture_weights={"energy/e1": 1.0, "energy/e2": 2.0, "web/w1": 3.0}),
    "seed": dict(max_length=32, seed=5, window_mode="random", stride=8),
}


def golden_corpus(directory: Path) -> Path:
    """Short, long and constant series in three domains and four datasets over three shards."""
    rng = np.random.default_rng(12)
    series = []
    for domain, dataset, n, high in (("energy", "e1", 40, 60), ("energy", "e2", 15, 400), ("nature", "n1", 10, 1500),
                                     ("web", "w1", 30, 30)):
        for length in rng.integers(2, high, n):
            values = rng.gamma(2.0, 3.0, length) * rng.choice([1.0, 0.0, 1e3], p=[0.8, 0.1, 0.1])
            series.append((domain, dataset, values.astype(np.float32)))
    order = rng.permutation(len(series))
    return write_corpus(directory, [series[i] for i in order], num_shards=3)
