"""Cutting one mixture group's sequences into units: each unit fills one row of a batch.

A unit is either a full window (max_length + 1 points of one sequence) or a bin of pieces shorter than a window
(whole short series, and in stride mode the tails of long ones). The bins are fixed by the seed, the epoch order of
units is not; since attention never crosses a piece boundary, which pieces share a row changes nothing but padding.

`cut_group` runs once, when the plan is built (`plan.py`); `GroupUnits` reads its arrays (memory maps of the plan
file) and turns units into pieces, vectorised over a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DataConfig
from .permute import derive_key, permute, uniform_ints

PACK_TAG, EPOCH_TAG, OFFSET_TAG = 1, 2, 3
_FIRST_SPAN, _MAX_SPAN = 64, 1 << 20  # bins tried at once by `pack`'s vectorised steps

# The arrays `cut_group` makes, in the order the plan file stores them.
GROUP_ARRAYS = ("window_seq", "window_cum", "short_seq", "short_start", "short_length", "bin_starts")


def pack(lengths_P: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of at most `capacity` points: the largest piece left, topped up with the smallest ones that still fit.

    Returns the pieces in bin order and the bin boundaries [n_bins + 1]. Near-full bins for short series and for
    the uniformly spread tails of long ones alike (random-order next-fit leaves a quarter of the latter empty).

    Bin b's anchor is the b-th largest piece and its top-up the smallest pieces left while they fit. While those
    smallest pieces all have one length ℓ (a corpus has a few thousand distinct lengths and millions of pieces),
    a bin with room r takes exactly r // ℓ of them, so runs of bins are computed at once; a bin whose top-up
    reaches longer pieces, or the anchors, takes one exact step.
    """
    n = len(lengths_P)
    ascending_P = np.argsort(lengths_P, kind="stable")
    sorted_P = lengths_P[ascending_P].astype(np.int64)
    ends_P = np.cumsum(sorted_P)
    room_B = capacity - sorted_P[::-1]
    fill_to_B = np.empty(n, dtype=np.int64)  # bin b's top-up is the ascending pieces [fill_to[b - 1], fill_to[b])
    lo = b = 0
    span = _FIRST_SPAN
    while lo < n - b:  # n - b: the pieces not yet anchors
        run_end = int(np.searchsorted(sorted_P, sorted_P[lo], side="right"))
        m = min(span, n - b - lo)
        to_M = lo + np.cumsum(room_B[b:b + m] // sorted_P[lo])
        beyond = np.flatnonzero((to_M > run_end) | (to_M > n - 1 - b - np.arange(m)))
        ok = int(beyond[0]) if len(beyond) else m
        if ok:
            fill_to_B[b:b + ok] = to_M[:ok]
            lo, b = int(to_M[ok - 1]), b + ok
        span = min(2 * span, _MAX_SPAN) if ok == m else max(_FIRST_SPAN, 2 * ok)
        if ok < m and lo < n - b:
            base = ends_P[lo - 1] if lo else 0
            lo = fill_to_B[b] = min(int(np.searchsorted(ends_P, base + room_B[b], side="right")), n - 1 - b)
            b += 1
    fill_to_B = fill_to_B[:b]
    fill_from_B = np.concatenate([[0], fill_to_B[:-1]])[:b]
    fill_B = fill_to_B - fill_from_B
    starts_B1 = np.concatenate([[0], np.cumsum(1 + fill_B)])
    order_P = np.empty_like(ascending_P)
    order_P[starts_B1[:-1]] = ascending_P[n - 1 - np.arange(b)]
    # The top-ups are the ascending pieces [0, lo) in bin order; each bin's run follows its anchor.
    order_P[np.repeat(starts_B1[:-1] + 1, fill_B) + np.arange(lo) - np.repeat(fill_from_B, fill_B)] = \
        ascending_P[:lo]
    return order_P, starts_B1


def cut_group(group: int, seqs_S: np.ndarray, length_S: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The units of one group: windows per sequence and packed bins of short pieces (GROUP_ARRAYS).

    length_S is what may be trained on (the stored length less holdout_points)."""
    W, stride = cfg.window_points, cfg.window_stride
    full_S = np.where(length_S >= W, (length_S - W) // stride + 1, 0)
    tail_start_S = full_S * stride
    has_tail_S = length_S - tail_start_S >= 2  # a piece needs two points to have one label
    if cfg.window_mode == "stride":
        windows_S, short_S = full_S, has_tail_S
    else:  # as many windows per epoch as stride mode has pieces, each at a random offset
        windows_S = np.where(full_S > 0, full_S + has_tail_S, 0)
        short_S = (full_S == 0) & has_tail_S
    keep = windows_S > 0
    short_seq, short_start = seqs_S[short_S], tail_start_S[short_S]
    short_length = length_S[short_S] - short_start
    if cfg.packing:
        # A seeded shuffle first, so that equal lengths meet in a random order.
        shuffled_P = permute(derive_key(cfg.seed, PACK_TAG, group), np.arange(len(short_seq)), len(short_seq))
        order_P, bin_starts = pack(short_length[shuffled_P], W)
        order_P = shuffled_P[order_P]
    else:
        order_P, bin_starts = np.arange(len(short_seq)), np.arange(len(short_seq) + 1)
    return {  # pieces stored in bin order: bin b is the slice bin_starts[b]:bin_starts[b + 1]
        "window_seq": seqs_S[keep].astype(np.int64),
        "window_cum": np.concatenate([[0], np.cumsum(windows_S[keep])]).astype(np.int64),
        "short_seq": short_seq[order_P].astype(np.int64),
        "short_start": short_start[order_P].astype(np.int64),
        "short_length": short_length[order_P].astype(np.int64),
        "bin_starts": bin_starts.astype(np.int64),
    }


@dataclass
class Pieces:
    """Pieces of many rows, in row order and, within a row, in the order they are laid out."""
    row_P: np.ndarray
    seq_P: np.ndarray
    start_P: np.ndarray
    length_P: np.ndarray

    @staticmethod
    def concat(parts: list[Pieces]) -> Pieces:
        """One Pieces of all parts, sorted by row (stable: a row's pieces keep their order)."""
        joined = [np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0, np.int64)
                  for f in ("row_P", "seq_P", "start_P", "length_P")]
        order = np.argsort(joined[0], kind="stable")
        return Pieces(*(a[order] for a in joined))


class GroupUnits:
    def __init__(self, group: int, arrays: dict[str, np.ndarray], length_S: np.ndarray, cfg: DataConfig):
        self.group, self.cfg, self.length_S = group, cfg, length_S
        for name in GROUP_ARRAYS:
            setattr(self, name, arrays[name])
        self.num_windows = int(self.window_cum[-1])
        self.num_bins = len(self.bin_starts) - 1

    @property
    def num_units(self) -> int:
        return self.num_windows + self.num_bins

    def epoch_units(self, epoch: int, draws_N: np.ndarray) -> np.ndarray:
        """Unit taken by each draw (position inside the epoch): a fresh permutation every epoch."""
        return permute(derive_key(self.cfg.seed, EPOCH_TAG, self.group, epoch), draws_N, self.num_units)

    def pieces(self, epoch: int, units_N: np.ndarray, rows_N: np.ndarray) -> Pieces:
        """The pieces of units units_N of one epoch, which fill batch rows rows_N."""
        units_N = np.asarray(units_N, dtype=np.int64)
        is_window_N = units_N < self.num_windows
        windows_N = units_N[is_window_N]
        i_N = np.searchsorted(self.window_cum, windows_N, side="right") - 1
        W = self.cfg.window_points
        if self.cfg.window_mode == "stride":
            offset_N = (windows_N - self.window_cum[i_N]) * self.cfg.window_stride
        else:
            key = derive_key(self.cfg.seed, OFFSET_TAG, self.group, epoch)
            trained_N = self.length_S[self.window_seq[i_N]].astype(np.int64) - self.cfg.holdout_points
            offset_N = uniform_ints(key, windows_N, trained_N - W + 1)
        windows = Pieces(rows_N[is_window_N], self.window_seq[i_N], offset_N, np.full(len(windows_N), W))

        bins_N = units_N[~is_window_N] - self.num_windows
        lo_N, count_N = self.bin_starts[bins_N], self.bin_starts[bins_N + 1] - self.bin_starts[bins_N]
        first_N = np.cumsum(count_N) - count_N
        at_P = np.repeat(lo_N - first_N, count_N) + np.arange(int(count_N.sum()))
        bins = Pieces(np.repeat(rows_N[~is_window_N], count_N), self.short_seq[at_P], self.short_start[at_P],
                      self.short_length[at_P])
        return Pieces.concat([windows, bins])
