"""Where a series holds a copy of part of one of many reference stretches, found by content, rescaled or not.

Candidates: both sides are cut into ``BLOCK``-point windows, z-normalised and hashed as the CSV leakage guard hashes
(``data_prep.leakage.block_hashes``): every window of every reference (stride 1), and the series' windows starting
at multiples of ``STRIDE``, so that a copy of ``BLOCK + STRIDE - 1`` reference points or more always shares a hash.
Windows repeated at more than ``MAX_PLACES`` places across the references (flat runs, rare counts) identify no place
and are not indexed.

Short windows collide by chance (near-straight stretches look alike once normalised), so a shared hash is only a
candidate alignment, ``series[i] ≈ a · reference[i - shift] + b`` with the scale and offset of the shared window.
Along it, the series and the reference *agree* where they differ by at most ``TOLERANCE`` of the reference's
standard deviation (plus float32 rounding; a NaN on either side neither agrees nor disagrees); ``BLOCK`` disagreeing
points in a row end a stretch, and each stretch holding a shared window, trimmed to its agreeing ends, is a copy
when

- at least ``AGREEMENT`` of its points where both sides are finite agree (a copy with revised points still counts),
- it holds at least ``EVIDENCE`` agreeing points, or all of a shorter reference's finite points, and
- the reference is not a straight line there: what a line through it leaves is at least ``INFORMATIVE`` of its
  standard deviation, so that agreeing within ``TOLERANCE`` says something (a ramp matches any ramp).

So a copy of at least ``EVIDENCE`` consecutive points of a reference, or of all of a shorter one, is found wherever it
starts, and an unrelated series, whose points would have to fall within 1/1000 of a standard deviation of the
reference's at 90 % of ``EVIDENCE`` places, is not. Values are compared as float32, as corpora store them: an
exact copy hashes identically whatever its offset; a rescaled one may round a point of a window across a 1/100-σ
step of the hash, which only loses that window.

The index (the references' values and their sorted window hashes) is a folder of ``.npy`` files, built once per job
and memory-mapped by every worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.leakage import block_hashes

BLOCK = 12
STRIDE = 8
EVIDENCE = 48
TOLERANCE = 1e-3
AGREEMENT = 0.9
INFORMATIVE = 0.01
MAX_PLACES = 64
FLOAT32_EPS = float(np.finfo(np.float32).eps)
_ARRAYS = ("values", "offsets", "hashes", "refs", "positions")


@dataclass(frozen=True)
class Match:
    """``series[i] ≈ a · reference[i - shift] + b`` for the series' points ``[start, stop)`` (first and last
    agreeing)."""

    ref: int
    shift: int
    start: int
    stop: int


def _windows(values: np.ndarray) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(values, BLOCK) if len(values) >= BLOCK else np.empty((0, BLOCK))


class SpanIndex:
    """References ``0..n-1`` (float32 stretches), their window hashes sorted, each hash's (reference, position)."""

    def __init__(self, values, offsets, hashes, refs, positions) -> None:
        self.values, self.offsets, self.hashes, self.refs, self.positions = values, offsets, hashes, refs, positions

    @classmethod
    def build(cls, references: Iterable[np.ndarray]) -> SpanIndex:
        values, lengths, hashes, refs, positions = [], [0], [], [], []
        for i, ref in enumerate(references):
            ref = np.asarray(ref, np.float32)
            h, pos = block_hashes(_windows(ref.astype(np.float64)))
            values.append(ref)
            lengths.append(len(ref))
            hashes.append(h)
            refs.append(np.full(len(h), i, np.int32))
            positions.append(pos.astype(np.int32))
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype)  # noqa: E731
        h, r, p = cat(hashes, np.uint64), cat(refs, np.int32), cat(positions, np.int32)
        order = np.lexsort((p, r, h))  # by hash, ties in reference order: the same index for the same references
        h, r, p = h[order], r[order], p[order]
        _, count = np.unique(h, return_counts=True)
        common = np.repeat(count > MAX_PLACES, count)
        return cls(cat(values, np.float32), np.cumsum(lengths, dtype=np.int64), h[~common], r[~common], p[~common])

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> SpanIndex:
        return cls(*(np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def reference(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def matches(self, series: np.ndarray) -> list[Match]:
        """Every stretch of ``series`` that copies part of a reference, by reference, shift and position."""
        x = np.asarray(series, np.float32).astype(np.float64)
        h, rows = block_hashes(_windows(x)[::STRIDE])
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        hit = np.flatnonzero(hi > lo)
        if not hit.size:
            return []
        # Every (series window, reference place) pair with equal hashes.
        count = (hi - lo)[hit]
        places = np.repeat(lo[hit] - np.cumsum(count) + count, count) + np.arange(count.sum())
        at = np.repeat(rows[hit] * STRIDE, count)
        ref, pos = np.asarray(self.refs[places], np.int64), np.asarray(self.positions[places], np.int64)
        pairs, group = np.unique(np.stack([ref, at - pos]), axis=1, return_inverse=True)
        found = []
        for g, (r, shift) in enumerate(pairs.T.tolist()):
            found += self._verify(x, r, shift, at[group == g])
        return found

    def _verify(self, x: np.ndarray, ref: int, shift: int, hits: np.ndarray) -> list[Match]:
        """The copies of reference ``ref`` at ``shift`` in ``x`` around the shared windows starting at ``hits``."""
        r = np.asarray(self.reference(ref), np.float64)
        c_B, r_B = x[hits[0]:hits[0] + BLOCK], r[hits[0] - shift:hits[0] - shift + BLOCK]
        scale = c_B.std() / r_B.std()
        offset = c_B.mean() - scale * r_B.mean()
        start, stop = max(0, shift), min(len(x), shift + len(r))
        c, rr = x[start:stop], r[start - shift:stop - shift]
        both = np.isfinite(c) & np.isfinite(rr)  # the shared windows' points are: never empty
        fitted = scale * rr + offset
        with np.errstate(invalid="ignore"):
            slack = 2 * FLOAT32_EPS * (np.abs(c) + np.abs(fitted))
            agree = both & (np.abs(c - fitted) <= TOLERANCE * scale * rr[both].std() + slack)
        # A stretch ends at BLOCK disagreeing points in a row: mark every point of such runs.
        runs = np.convolve(both & ~agree, np.ones(BLOCK, np.int64), "valid") == BLOCK
        broken = np.convolve(runs, np.ones(BLOCK, np.int64))[:len(c)] > 0
        stretch = np.cumsum(broken)  # equal on the unbroken points of one stretch
        found = []
        for k in np.unique(stretch[hits - start][~broken[hits - start]]).tolist():
            good = np.flatnonzero(agree & ~broken & (stretch == k))
            if not good.size:  # the shared windows themselves disagree: the hashes collided
                continue
            lo, hi = good[0], good[-1] + 1
            finite = both[lo:hi]
            agreeing = int(agree[lo:hi].sum())
            if agreeing < AGREEMENT * finite.sum() or agreeing < min(EVIDENCE, int(np.isfinite(r).sum())):
                continue
            t, v = np.flatnonzero(finite).astype(np.float64), rr[lo:hi][finite]
            if np.std(v - np.polyval(np.polyfit(t, v, 1), t)) < INFORMATIVE * np.std(v):
                continue
            found.append(Match(ref, shift, int(start + lo), int(start + hi)))
        return found
