"""Cutting one mixture group's sequences into units: each unit fills one row of a batch.

A unit is either a full window (max_length + 1 points of one sequence) or a bin of pieces shorter than a window
(whole short series, and in stride mode the tails of long ones) packed next-fit in a seeded order. The bins are
fixed by the seed, the epoch order of units is not; since attention never crosses a piece boundary, which pieces
share a row changes nothing but padding.
"""

from __future__ import annotations

import numpy as np

from .config import DataConfig
from .permute import derive_key, permute, uniform_ints

PACK_TAG, EPOCH_TAG, OFFSET_TAG = 1, 2, 3

# A piece of a row: (sequence index, first point, number of points).
Piece = tuple[int, int, int]


def next_fit(lengths_P: np.ndarray, capacity: int) -> np.ndarray:
    """Bin boundaries [n_bins + 1] of next-fit packing in the given order: a bin takes pieces while they fit."""
    ends_P = np.cumsum(lengths_P)
    starts, p = [0], 0
    while p < len(lengths_P):
        base = ends_P[p - 1] if p else 0
        p = int(np.searchsorted(ends_P, base + capacity, side="right"))
        starts.append(p)
    return np.asarray(starts, dtype=np.int64)


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
        self.short_seq = seqs_S[short_S]
        self.short_start = tail_start_S[short_S]
        self.short_length = length_S[short_S] - self.short_start
        self.pack_key = derive_key(cfg.seed, PACK_TAG, group)
        n_short = len(self.short_seq)
        if cfg.packing and n_short:
            order_P = permute(self.pack_key, np.arange(n_short), n_short)
            self.bin_starts = next_fit(self.short_length[order_P], W)
        else:
            self.bin_starts = None
        self.num_windows = int(self.window_cum[-1])
        self.num_bins = n_short if self.bin_starts is None else len(self.bin_starts) - 1

    @property
    def num_units(self) -> int:
        return self.num_windows + self.num_bins

    @property
    def points(self) -> int:
        return int(self.window_length.sum() + self.short_length.sum())

    def epoch_units(self, epoch: int, draws_N: np.ndarray) -> np.ndarray:
        """Unit taken by each draw (position inside the epoch): a fresh permutation every epoch."""
        return permute(derive_key(self.cfg.seed, EPOCH_TAG, self.group, epoch), draws_N, self.num_units)

    def pieces(self, epoch: int, unit: int) -> list[Piece]:
        if unit < self.num_windows:
            i = int(np.searchsorted(self.window_cum, unit, side="right")) - 1
            k = unit - int(self.window_cum[i])
            length = int(self.window_length[i])
            if self.cfg.window_mode == "stride":
                offset = k * self.cfg.window_stride
            else:
                key = derive_key(self.cfg.seed, OFFSET_TAG, self.group, epoch)
                offset = int(uniform_ints(key, np.array([unit]), length - self.cfg.window_points + 1)[0])
            return [(int(self.window_seq[i]), offset, self.cfg.window_points)]
        b = unit - self.num_windows
        if self.bin_starts is None:
            idx_P = np.array([b])
        else:
            positions = np.arange(self.bin_starts[b], self.bin_starts[b + 1])
            idx_P = permute(self.pack_key, positions, len(self.short_seq))
        return [(int(self.short_seq[p]), int(self.short_start[p]), int(self.short_length[p])) for p in idx_P]
