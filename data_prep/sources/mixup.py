"""TSMixup: new series as convex combinations of real ones (Chronos, Ansari et al. 2024), seeded.

Each mixup draws k ~ U{1..``max_components``} segments of ``length`` points from the real series of one sampling
frequency, z-scores each segment over itself and combines them with weights ~ Dirichlet(``concentration``). Only
series of one frequency are mixed, so the daily and weekly cycles they carry stay at the periods of real data (24
and 168 for hourly series, 48 for half-hourly ones) instead of beating against each other. The frequency group is
drawn in proportion to its points, and each segment's series in proportion to its usable points.

The last ``tail_excluded`` points of every real series are never drawn from: runs that hold out each sequence's
tail (``data.holdout_points`` up to that many) for evaluation must not meet it again inside a mixup. The result is a
pure function of the fields and of the pool (the real series, in corpus order), which the manifest pins through the
packages' versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class TSMixup:
    seed: int = 0
    num_series: int = 8000  # 16M points: the demo's 1,000 steps draw about 3M of them, none twice
    length: int = 2048
    max_components: int = 3
    concentration: float = 1.5  # Dirichlet α of the mixing weights (Chronos: 1.5)
    freqs: tuple[str, ...] = ("h", "30min")  # the sampling frequencies whose series are mixed, each with its own
    tail_excluded: int = 720

    def __post_init__(self):
        object.__setattr__(self, "freqs", tuple(str(f) for f in self.freqs))
        if self.num_series < 0 or self.length < 2 or self.max_components < 1 or self.tail_excluded < 0:
            raise ValueError(f"TSMixup: num_series >= 0, length >= 2, max_components >= 1 and tail_excluded >= 0 "
                             f"required; got {self.num_series}, {self.length}, {self.max_components}, "
                             f"{self.tail_excluded}")
        if not self.concentration > 0:
            raise ValueError(f"TSMixup.concentration {self.concentration}: must be > 0")
        if not self.freqs:
            raise ValueError("TSMixup.freqs: name at least one sampling frequency")

    def describe(self) -> dict:
        return {"generator": "TSMixup (Dirichlet-weighted z-scored segments of real series, one frequency each)",
                **asdict(self)}

    def usable(self, values: np.ndarray) -> int:
        """Points a segment may start in (0: the series is too short to draw from)."""
        return max(0, len(values) - self.tail_excluded - self.length + 1)

    def series(self, index: int, pool_F: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Mixup `index`: float64 [length]. `pool_F` holds, per frequency, the real series (in corpus order) that
        have at least one usable start; the same (seed, index, pool) always gives the same series."""
        rng = np.random.default_rng([self.seed, index])
        starts_FS = [np.array([self.usable(v) for v in group], dtype=np.float64) for group in pool_F]
        points_F = np.array([s.sum() for s in starts_FS])
        f = int(rng.choice(len(pool_F), p=points_F / points_F.sum()))
        k = int(rng.integers(1, self.max_components + 1))
        weights_K = rng.dirichlet(np.full(k, self.concentration))
        out = np.zeros(self.length)
        for w in weights_K:
            s = int(rng.choice(len(pool_F[f]), p=starts_FS[f] / points_F[f]))
            start = int(rng.integers(0, starts_FS[f][s]))
            segment = np.asarray(pool_F[f][s][start:start + self.length], dtype=np.float64)
            std = np.nanstd(segment)
            out += w * (segment - np.nanmean(segment)) / (std if std > 0 else 1.0)
        return out
