"""Cutting one mixture group's sequences into units: each unit fills one row of a batch.

A unit is either a full window (max_length + 1 points of one sequence) or a bin of pieces shorter than a window
(whole short series, and in stride mode the tails of long ones). The bins are fixed by the seed, the epoch order of
units is not; since attention never crosses a piece boundary, which pieces share a row changes nothing but padding.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .permute import derive_key, permute, uniform_ints

PACK_TAG, EPOCH_TAG, OFFSET_TAG = 1, 2, 3
_PROGRESS_FROM = 1 << 20  # pieces; packing fewer takes well under a second

# A piece of a row: (sequence index, first point, number of points).
Piece = tuple[int, int, int]


def pack(lengths_P: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of at most `capacity` points: the largest piece left, topped up with the smallest ones that still fit.

    Returns the pieces in bin order and the bin boundaries [n_bins + 1]. Near-full bins for short series and for
    the uniformly spread tails of long ones alike (random-order next-fit leaves a quarter of the latter empty).
    """
    ascending_P = np.argsort(lengths_P, kind="stable")
    # Python lists and bisect: this loop runs once per bin, tens of millions of times on a Time-300B-size corpus.
    sorted_lengths = lengths_P[ascending_P].tolist()
    ends = np.cumsum(lengths_P[ascending_P]).tolist()
    anchors, fill_from, fill_to = [], [], []
    lo, hi = 0, len(ascending_P)
    with tqdm(total=hi, desc="packing short series", unit="piece", disable=True if hi < _PROGRESS_FROM else None,
              mininterval=1.0) as progress:
        while lo < hi:
            hi -= 1
            room = capacity - sorted_lengths[hi]
            k = min(bisect_right(ends, (ends[lo - 1] if lo else 0) + room), hi)
            anchors.append(hi)
            fill_from.append(lo)
            fill_to.append(k)
            if len(anchors) % 4096 == 0:
                progress.update(k - progress.n + len(anchors))
            lo = k
        progress.update(len(ascending_P) - progress.n)
    fill_from_B = np.asarray(fill_from, dtype=np.int64)
    fill_B = np.asarray(fill_to, dtype=np.int64) - fill_from_B
    starts_B1 = np.concatenate([[0], np.cumsum(1 + fill_B)])
    order_P = np.empty_like(ascending_P)
    order_P[starts_B1[:-1]] = ascending_P[np.asarray(anchors, dtype=np.int64)]
    # The top-ups are the ascending pieces [0, lo) in bin order; each bin's run follows its anchor.
    order_P[np.repeat(starts_B1[:-1] + 1, fill_B) + np.arange(lo) - np.repeat(fill_from_B, fill_B)] = \
        ascending_P[:lo]
    return order_P, starts_B1


class GroupUnits:
    def __init__(self, group: int, seqs_S: np.ndarray, length_S: np.ndarray, cfg: DataConfig):
        self.group, self.cfg = group, cfg
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
        self.window_seq = seqs_S[keep]
        self.window_length = length_S[keep]
        self.window_cum = np.concatenate([[0], np.cumsum(windows_S[keep])]).astype(np.int64)
        short_seq, short_start = seqs_S[short_S], tail_start_S[short_S]
        short_length = length_S[short_S] - short_start
        if cfg.packing:
            # A seeded shuffle first, so that equal lengths meet in a random order.
            shuffled_P = permute(derive_key(cfg.seed, PACK_TAG, group), np.arange(len(short_seq)), len(short_seq))
            order_P, self.bin_starts = pack(short_length[shuffled_P], W)
            order_P = shuffled_P[order_P]
        else:
            order_P, self.bin_starts = np.arange(len(short_seq)), np.arange(len(short_seq) + 1)
        # Pieces stored in bin order: bin b is the slice bin_starts[b]:bin_starts[b + 1].
        self.short_seq, self.short_start, self.short_length = short_seq[order_P], short_start[order_P], \
            short_length[order_P]
        self.num_windows = int(self.window_cum[-1])
        self.num_bins = len(self.bin_starts) - 1

    @property
    def num_units(self) -> int:
        return self.num_windows + self.num_bins

    @property
    def points(self) -> int:
        return int(self.window_length.sum() + self.short_length.sum())

    def epoch_units(self, epoch: int, draws_N: np.ndarray) -> np.ndarray:
        """Unit taken by each draw (position inside the epoch): a fresh permutation every epoch."""
        return permute(derive_key(self.cfg.seed, EPOCH_TAG, self.group, epoch), draws_N, self.num_units)

    def rows(self, epoch: int, units_N: np.ndarray) -> list[list[Piece]]:
        """The pieces of each unit, vectorised over the units of one epoch."""
        units_N = np.asarray(units_N, dtype=np.int64)
        out: list[list[Piece]] = [[] for _ in units_N]
        is_window_N = units_N < self.num_windows
        windows_N = units_N[is_window_N]
        i_N = np.searchsorted(self.window_cum, windows_N, side="right") - 1
        if self.cfg.window_mode == "stride":
            offset_N = (windows_N - self.window_cum[i_N]) * self.cfg.window_stride
        else:
            key = derive_key(self.cfg.seed, OFFSET_TAG, self.group, epoch)
            offset_N = uniform_ints(key, windows_N, self.window_length[i_N] - self.cfg.window_points + 1)
        for r, seq, offset in zip(np.flatnonzero(is_window_N), self.window_seq[i_N], offset_N):
            out[r] = [(int(seq), int(offset), self.cfg.window_points)]

        bins_N = units_N[~is_window_N] - self.num_windows
        for r, lo, hi in zip(np.flatnonzero(~is_window_N), self.bin_starts[bins_N], self.bin_starts[bins_N + 1]):
            out[r] = list(zip(self.short_seq[lo:hi].tolist(), self.short_start[lo:hi].tolist(),
                              self.short_length[lo:hi].tolist()))
        return out
