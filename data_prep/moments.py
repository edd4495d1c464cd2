"""Per-sequence mean and standard deviation, computed once at prep time and used by the loader's "sequence"
normalisation.

`moments` is the definition (float64 statistics of the float32 values, as the released code computes them);
`sequence_moments` gives the same numbers, bit for bit, for every sequence of a flat array at once.
"""

from __future__ import annotations

import numpy as np

# Up to this length, sequences of equal length are reduced together as the rows of one 2-D array; numpy sums
# each contiguous row exactly as it sums a 1-D array of that length (pairwise, within one cast buffer).
_GROUPED_UP_TO = 4096


def moments(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation in float64; a std of 0 counts as 1 (a constant series stays finite)."""
    std = x.std(dtype=np.float64)
    return x.mean(dtype=np.float64), (std if std > 0 else 1.0)


def sequence_moments(values: np.ndarray, offsets_S1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean_S, std_S of sequences values[offsets[s]:offsets[s + 1]], each equal to `moments` of that slice."""
    offsets_S1 = np.asarray(offsets_S1, dtype=np.int64)
    length_S = np.diff(offsets_S1)
    mean_S, std_S = np.zeros(len(length_S)), np.ones(len(length_S))
    grouped = (length_S > 0) & (length_S <= _GROUPED_UP_TO)
    for n in np.unique(length_S[grouped]):
        seqs = np.flatnonzero(length_S == n)
        x_KN = values[offsets_S1[seqs, None] + np.arange(n)]
        mean = x_KN.mean(axis=1, dtype=np.float64)
        std = x_KN.std(axis=1, dtype=np.float64)
        mean_S[seqs], std_S[seqs] = mean, np.where(std > 0, std, 1.0)
    for s in np.flatnonzero(length_S > _GROUPED_UP_TO):
        mean_S[s], std_S[s] = moments(values[offsets_S1[s]:offsets_S1[s + 1]])
    return mean_S, std_S
