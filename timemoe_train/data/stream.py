"""The global sample stream: global row index -> the pieces of that row -> batch arrays.

Everything here is a pure function of (seed, corpus, config, row index), so any process can build any row: ranks
split global batches by rows, workers split them by micro-batch, and resuming is setting an index.
"""

from __future__ import annotations

import numpy as np

from .config import DataConfig
from .errors import DataError
from .mixture import Mixture, mixture_probabilities
from .shards import ShardStore
from .windows import GroupUnits, Piece

_STATS_CACHE = 4096


def moments(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation in float64, as the released code computes them; a std of 0 counts as 1."""
    std = x.std(dtype=np.float64)
    return x.mean(dtype=np.float64), (std if std > 0 else 1.0)


class SampleStream:
    def __init__(self, store: ShardStore, cfg: DataConfig):
        self.store, self.cfg = store, cfg
        by_domain = cfg.mixture_by == "domain"
        self.group_names = store.domain_names if by_domain else store.dataset_names
        group_S = store.domain_S if by_domain else store.dataset_S
        counts = store.manifest.domains if by_domain else store.manifest.datasets
        order_S = np.argsort(group_S, kind="stable")
        bounds = np.searchsorted(group_S[order_S], np.arange(len(self.group_names) + 1))
        self.groups = []
        for g in range(len(self.group_names)):
            seqs_S = order_S[bounds[g]:bounds[g + 1]]
            trainable_S = np.maximum(store.length_S[seqs_S] - cfg.holdout_points, 0)
            self.groups.append(GroupUnits(g, seqs_S, trainable_S, cfg))
        p_G = mixture_probabilities(self.group_names, [counts[n]["points"] for n in self.group_names],
                                    [u.num_units for u in self.groups], cfg, str(store.manifest.path))
        if (p_G > 0).sum() > cfg.mixture_block:
            raise DataError("DataConfig", "mixture_block", cfg.mixture_block,
                            f"smaller than the {(p_G > 0).sum()} groups sampled")
        self.probabilities = p_G
        self.mixture = Mixture(p_G, cfg.mixture_block, cfg.seed)
        self._stats: dict[int, tuple[float, float]] = {}

    def row_pieces(self, rows_N: np.ndarray) -> list[list[Piece]]:
        group_N, draw_N = self.mixture.locate(rows_N)
        out: list[list[Piece]] = [[] for _ in rows_N]
        for g in np.unique(group_N):
            units = self.groups[g]
            here = np.flatnonzero(group_N == g)
            epoch_N = draw_N[here] // units.num_units
            for e in np.unique(epoch_N):
                sel = here[epoch_N == e]
                rows = units.rows(int(e), units.epoch_units(int(e), draw_N[sel] % units.num_units))
                for i, pieces in zip(sel, rows):
                    out[i] = pieces
        return out

    def _normalise(self, seq: int, start: int, length: int) -> np.ndarray:
        values = self.store.sequence(seq)
        values = values[:len(values) - self.cfg.holdout_points]
        piece = values[start:start + length]
        if self.cfg.normalization == "none":
            return piece
        if self.cfg.normalization == "window" or length == len(values):
            mean, std = moments(piece)
        else:  # long series yield many windows: keep their statistics rather than re-read the series every time
            stats = self._stats.get(seq)
            if stats is None:
                if len(self._stats) >= _STATS_CACHE:
                    self._stats.clear()
                stats = self._stats[seq] = moments(values)
            mean, std = stats
        return ((piece - mean) / std).astype(np.float32)

    def batch(self, rows_N: np.ndarray) -> dict[str, np.ndarray]:
        """Rows as model inputs: inputs/labels [N, T] float32, loss_mask bool, sequence_ids/domain_ids int64."""
        W = self.cfg.window_points
        values_NW = np.zeros((len(rows_N), W), dtype=np.float32)
        seq_NW = np.full((len(rows_N), W), -1, dtype=np.int64)
        domain_NW = np.full((len(rows_N), W), -1, dtype=np.int64)
        for r, pieces in enumerate(self.row_pieces(rows_N)):
            at = 0
            for i, (seq, start, length) in enumerate(pieces):
                values_NW[r, at:at + length] = self._normalise(seq, start, length)
                seq_NW[r, at:at + length] = i
                domain_NW[r, at:at + length] = self.store.domain_S[seq]
                at += length
        same_NT = (seq_NW[:, :-1] == seq_NW[:, 1:]) & (seq_NW[:, 1:] >= 0)
        return {
            "inputs": values_NW[:, :-1],
            "labels": values_NW[:, 1:],
            "loss_mask": same_NT,
            "sequence_ids": seq_NW[:, :-1],
            "domain_ids": domain_NW[:, :-1],
        }
