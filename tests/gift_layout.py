"""Fixtures in GIFT-Eval's on-disk layout: one `datasets` `save_to_disk` directory per configuration, rows
{item_id, start, freq, target} with `target` float32, 1-D or [variates, T], as GIFT-Eval's own files hold them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_config(root: Path, name: str, targets: list[np.ndarray], freq: str, ids: list[str] | None = None,
                start: str = "2020-01-01", extra: bool = True) -> Path:
    """Write `targets` (1-D arrays, or 2-D [variates, T]) as configuration `name` under `root`; NaN stays NaN.
    `extra` adds a field every reader must ignore (GIFT-Eval's multivariate configurations carry such)."""
    import datasets

    multivariate = targets[0].ndim == 2
    value = datasets.Value("float32")
    target = datasets.Sequence(datasets.Sequence(value)) if multivariate else datasets.Sequence(value)
    features = {"item_id": datasets.Value("string"), "start": datasets.Value("timestamp[s]"),
                "freq": datasets.Value("string"), "target": target}
    rows = {"item_id": ids or [f"item_{i}" for i in range(len(targets))],
            "start": [np.datetime64(start, "s")] * len(targets), "freq": [freq] * len(targets),
            "target": [np.asarray(t, np.float32).tolist() for t in targets]}
    if extra:
        features["past_feat_dynamic_real"] = datasets.Sequence(value)
        rows["past_feat_dynamic_real"] = [[0.0, 1.0]] * len(targets)
    path = root / name
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).save_to_disk(str(path))
    return path


def walk(rng: np.random.Generator, n: int, scale: float = 1.0, level: float = 100.0) -> np.ndarray:
    """A random walk: no two stretches alike, as real series are."""
    return (level + scale * np.cumsum(rng.normal(size=n))).astype(np.float32)
