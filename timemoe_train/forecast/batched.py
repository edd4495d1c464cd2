"""The forecasting core every consumer calls (`timemoe-forecast`, `timemoe-eval`, the fine-tuning report): many
contexts of any lengths -> forecasts at one or more horizons, in batches.

Contexts are sorted by length and cut into batches of `batch_size` neighbours, each left-padded to its longest
(similar lengths together: little padding), and every horizon comes from one roll-out per batch
(`model.rollout.roll_out`). A model loaded through its own remote code (`--backend remote`) has only
`forecast(context_BT, horizon)`: its batches hold contexts of one length, one roll-out per horizon.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..model import TimeMoeForPrediction
from ..model.rollout import roll_out


def length_batches(lengths_N: np.ndarray, batch_size: int, same_length: bool = False) -> list[np.ndarray]:
    """Indices of the contexts in each batch: longest first, neighbours by length together; `same_length`: a batch
    never mixes lengths."""
    order = np.argsort(-lengths_N, kind="stable")
    if not same_length:
        return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    out = []
    for length in np.unique(lengths_N)[::-1]:
        same = order[lengths_N[order] == length]
        out += [same[b:b + batch_size] for b in range(0, len(same), batch_size)]
    return out


def forecast_contexts(model, contexts: Sequence[np.ndarray], horizons: Sequence[int], batch_size: int,
                      bar=None) -> dict[int, np.ndarray]:
    """{horizon: forecasts [N, horizon] float32}, rows in the order of `contexts` (1-D arrays of finite values, at
    least one point each). `bar`: a tqdm bar advanced by the contexts done."""
    horizons = sorted({int(h) for h in horizons})
    out = {h: np.empty((len(contexts), h), dtype=np.float32) for h in horizons}
    if not len(contexts):
        return out
    lengths_N = np.array([len(c) for c in contexts])
    ours = isinstance(model, TimeMoeForPrediction)
    device = next(model.parameters()).device
    for rows in length_batches(lengths_N, batch_size, same_length=not ours):
        T = int(lengths_N[rows].max())
        context_BT = np.zeros((len(rows), T), dtype=np.float32)
        for b, i in enumerate(rows):
            context_BT[b, T - lengths_N[i]:] = contexts[i]
        context_BT = torch.from_numpy(context_BT).to(device)
        if ours:
            lengths_B = torch.from_numpy(lengths_N[rows]).to(device)
            forecasts = roll_out(model, context_BT, horizons, lengths_B if int(lengths_N[rows].min()) < T else None)
        else:
            with torch.no_grad():
                forecasts = {h: model.forecast(context_BT, h) for h in horizons}
        for h in horizons:
            out[h][rows] = forecasts[h].float().cpu().numpy()
        if bar is not None:
            bar.update(len(rows))
    return out
