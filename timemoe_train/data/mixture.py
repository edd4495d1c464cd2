"""Which group each row of the global stream comes from, and how many rows that group has served before it.

Rows are dealt in blocks of `mixture_block`: every block holds exactly `quota[g]` rows of group g, in a seeded
order. So how many rows of group g precede a row follows from its block alone, which lets each group walk through
its units without replacement (epoch by epoch) while the stream stays a pure function of the row index.
"""

from __future__ import annotations

import numpy as np

from .config import DataConfig
from .errors import DataError
from .permute import derive_key, permute

BLOCK_TAG = 4


def mixture_probabilities(names: list[str], points: list[int], num_units: list[int], cfg: DataConfig,
                          source: str) -> np.ndarray:
    """p[g] ∝ weight[g]^(1/temperature); weight = the configured one, or the group's points in the manifest."""
    if cfg.mixture_weights is None:
        weights = np.array([p if u else 0 for p, u in zip(points, num_units)], dtype=np.float64)
    else:
        unknown = sorted(set(cfg.mixture_weights) - set(names))
        if unknown:
            raise DataError(source, f"mixture_weights.{unknown[0]}", cfg.mixture_weights[unknown[0]],
                            f"no {cfg.mixture_by} of that name in the corpus; it has {names}")
        weights = np.array([float(cfg.mixture_weights.get(n, 0.0)) for n in names])
        for n, w, u in zip(names, weights, num_units):
            if w > 0 and not u:
                raise DataError(source, f"mixture_weights.{n}", w,
                                f"this {cfg.mixture_by} has no sequence of 2 or more points to sample")
    if not weights.sum() > 0:
        raise DataError(source, "sequences", 0, "no sequence of 2 or more points to sample")
    scaled = np.where(weights > 0, weights / weights.max(), 0.0) ** (1.0 / cfg.mixture_temperature)
    return scaled / scaled.sum()


def block_quotas(p_G: np.ndarray, block: int) -> np.ndarray:
    """Rows per block for each group: largest remainder, and at least one row for every group with p > 0."""
    exact_G = p_G * block
    quota_G = np.floor(exact_G).astype(np.int64)
    quota_G[np.argsort(-(exact_G - quota_G), kind="stable")[: block - quota_G.sum()]] += 1
    for g in np.flatnonzero((p_G > 0) & (quota_G == 0)):
        quota_G[np.argmax(quota_G)] -= 1
        quota_G[g] = 1
    return quota_G


class Mixture:
    def __init__(self, p_G: np.ndarray, block: int, seed: int):
        self.block, self.seed = block, seed
        self.quota_G = block_quotas(p_G, block)
        self.cum_quota = np.concatenate([[0], np.cumsum(self.quota_G)])
        self._cached: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _deal(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(group, draw) of every row of block b: a seeded arrangement of quota[g] rows per group, and each row's
        rank among its group's rows in row order (so a group's draws come in order)."""
        if b not in self._cached:
            if len(self._cached) >= 2:  # a micro-batch spans at most two blocks
                self._cached.pop(next(iter(self._cached)))
            slot_Q = permute(derive_key(self.seed, BLOCK_TAG, b), np.arange(self.block), self.block)
            group_Q = np.searchsorted(self.cum_quota, slot_Q, side="right") - 1
            order_Q = np.argsort(group_Q, kind="stable")
            rank_Q = np.empty(self.block, dtype=np.int64)
            rank_Q[order_Q] = np.arange(self.block) - self.cum_quota[group_Q[order_Q]]
            self._cached[b] = (group_Q, b * self.quota_G[group_Q] + rank_Q)
        return self._cached[b]

    def locate(self, rows_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group, draw) of each global row: draw = how many rows of that group came before it."""
        rows_N = np.asarray(rows_N, dtype=np.int64)
        group_N, draw_N = np.empty_like(rows_N), np.empty_like(rows_N)
        block_N = rows_N // self.block
        for b in np.unique(block_N):
            here = block_N == b
            group_Q, draw_Q = self._deal(int(b))
            group_N[here], draw_N[here] = group_Q[rows_N[here] % self.block], draw_Q[rows_N[here] % self.block]
        return group_N, draw_N
