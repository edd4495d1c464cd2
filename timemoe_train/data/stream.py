"""The global sample stream: global row index -> the pieces of that row -> batch arrays.

Everything here is a pure function of (seed, corpus, config, row index), so any process can build any row: ranks
split global batches by rows, workers split them by micro-batch, and resuming is setting an index. The stream
reads the plan (`plan.py`) and holds nothing per sequence itself.
"""

from __future__ import annotations

import numpy as np

from data_prep.moments import sequence_moments

from .config import DataConfig
from .errors import DataError
from .corpus import Manifest
from .mixture import Mixture, mixture_probabilities
from .plan import Plan
from .shards import ShardStore
from .windows import GroupUnits, Pieces


class SampleStream:
    def __init__(self, manifest: Manifest, cfg: DataConfig, plan: Plan):
        self.cfg, self.plan = cfg, plan
        self.store = store = ShardStore(manifest, plan.arrays)
        self.group_names = plan.meta["group_names"]
        self.groups = [GroupUnits(g, plan.group(g), store.length_S, cfg) for g in range(len(self.group_names))]
        counts = manifest.domains if cfg.mixture_by == "domain" else manifest.datasets
        p_G = mixture_probabilities(self.group_names, [counts[n]["points"] for n in self.group_names],
                                    [u.num_units for u in self.groups], cfg, str(manifest.path))
        if (p_G > 0).sum() > cfg.mixture_block:
            raise DataError("DataConfig", "mixture_block", cfg.mixture_block,
                            f"smaller than the {(p_G > 0).sum()} groups sampled")
        self.probabilities = p_G
        self.mixture = Mixture(p_G, cfg.mixture_block, cfg.seed)

    def __reduce__(self):
        # Workers rebuild the stream from the plan (which maps its file again) instead of copying arrays.
        return SampleStream, (self.store.manifest, self.cfg, self.plan)

    def pieces(self, rows_N: np.ndarray) -> Pieces:
        group_N, draw_N = self.mixture.locate(rows_N)
        parts = []
        for g in np.unique(group_N):
            units = self.groups[g]
            here = np.flatnonzero(group_N == g)
            epoch_N = draw_N[here] // units.num_units
            for e in np.unique(epoch_N):
                sel = here[epoch_N == e]
                parts.append(units.pieces(int(e), units.epoch_units(int(e), draw_N[sel] % units.num_units), sel))
        return Pieces.concat(parts)

    def _normalise(self, values_X: np.ndarray, p: Pieces, offsets_P1: np.ndarray) -> np.ndarray:
        if self.cfg.normalization == "none":
            return values_X
        if self.cfg.normalization == "window":
            mean_P, std_P = sequence_moments(*self._statistics_points(values_X, offsets_P1))
        else:  # the plan's statistics of the (trained part of the) whole series
            stats_P2 = self.plan.arrays["stats_S2"][p.seq_P]
            mean_P, std_P = stats_P2[:, 0], stats_P2[:, 1]
        return ((values_X - np.repeat(mean_P, p.length_P)) / np.repeat(std_P, p.length_P)).astype(np.float32)

    def _statistics_points(self, values_X: np.ndarray, offsets_P1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The points each piece's window statistics are taken over, laid end to end, and their offsets."""
        length_P = np.diff(offsets_P1)
        kept_P = np.maximum(length_P - self.cfg.normalization_excludes, (length_P + 1) // 2)
        if (kept_P == length_P).all():
            return values_X, offsets_P1
        kept_offsets_P1 = np.concatenate([[0], np.cumsum(kept_P)])
        take_Y = np.repeat(offsets_P1[:-1] - kept_offsets_P1[:-1], kept_P) + np.arange(kept_offsets_P1[-1])
        return values_X[take_Y], kept_offsets_P1

    def batch(self, rows_N: np.ndarray) -> dict[str, np.ndarray]:
        """Rows as model inputs: inputs/labels [N, T] float32, loss_mask bool, sequence_ids/domain_ids int64."""
        W, N = self.cfg.window_points, len(rows_N)
        p = self.pieces(np.asarray(rows_N, dtype=np.int64))
        offsets_P1 = np.concatenate([[0], np.cumsum(p.length_P)])
        values_X = np.empty(offsets_P1[-1], dtype=np.float32)  # X: the points of all pieces, laid end to end
        for seq, start, lo, hi in zip(p.seq_P.tolist(), p.start_P.tolist(), offsets_P1[:-1].tolist(),
                                      offsets_P1[1:].tolist()):
            values_X[lo:hi] = self.store.sequence(seq)[start:start + hi - lo]
        first_P = np.searchsorted(p.row_P, p.row_P)  # the first piece of each piece's row
        at_P = offsets_P1[:-1] - offsets_P1[first_P]  # where the piece starts in its row
        flat_X = np.repeat(p.row_P * W + at_P - offsets_P1[:-1], p.length_P) + np.arange(len(values_X))
        values_NW = np.zeros((N, W), dtype=np.float32)
        seq_NW = np.full((N, W), -1, dtype=np.int64)
        domain_NW = np.full((N, W), -1, dtype=np.int64)
        values_NW.flat[flat_X] = self._normalise(values_X, p, offsets_P1)
        seq_NW.flat[flat_X] = np.repeat(np.arange(len(first_P)) - first_P, p.length_P)
        domain_NW.flat[flat_X] = np.repeat(self.store.domain_S[p.seq_P], p.length_P)
        same_NT = (seq_NW[:, :-1] == seq_NW[:, 1:]) & (seq_NW[:, 1:] >= 0)
        return {
            "inputs": values_NW[:, :-1],
            "labels": values_NW[:, 1:],
            "loss_mask": same_NT,
            "sequence_ids": seq_NW[:, :-1],
            "domain_ids": domain_NW[:, :-1],
        }
