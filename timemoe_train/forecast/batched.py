"""The forecasting core every consumer calls (`timemoe-forecast`, `timemoe-eval`, the fine-tuning report): many
contexts of any lengths -> forecasts at one or more horizons, in batches.

Contexts are sorted by length and cut into batches of `batch_size` neighbours, each left-padded to its longest
(similar lengths together: little padding), and every horizon comes from one roll-out per batch
(`model.rollout.roll_out`). A model loaded through its own remote code (`--backend remote`) has only
`forecast(context_BT, horizon)`: its batches hold contexts of one length, one roll-out per horizon.

`Contexts` holds them end to end in one array (as Arrow holds a list column): building a batch is one gather, not
a Python loop over its series, which is what bounds the series per second of a small model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model import TimeMoeForPrediction
from ..model.rollout import roll_out


@dataclass
class Contexts:
    """N contexts end to end: context i is values_P[offsets_N1[i]:offsets_N1[i + 1]] (float32, finite)."""

    values_P: np.ndarray
    offsets_N1: np.ndarray

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray]) -> "Contexts":
        offsets_N1 = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets_N1[1:])
        values_P = np.concatenate(arrays).astype(np.float32, copy=False) if len(arrays) else np.zeros(0, np.float32)
        return cls(values_P, offsets_N1)

    def __len__(self) -> int:
        return len(self.offsets_N1) - 1

    @property
    def lengths_N(self) -> np.ndarray:
        return np.diff(self.offsets_N1)

    def padded(self, rows_B: np.ndarray) -> np.ndarray:
        """[B, T] float32: the contexts of `rows_B` left-padded with zeros to the longest of them, T."""
        start_B, end_B = self.offsets_N1[rows_B], self.offsets_N1[rows_B + 1]
        T = int((end_B - start_B).max())
        index_BT = end_B[:, None] - T + np.arange(T)
        return np.where(index_BT >= start_B[:, None], self.values_P[np.maximum(index_BT, 0)], np.float32(0))


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


def forecast_batch(model, context_BT: torch.Tensor, horizons: Sequence[int],
                   lengths_B: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{horizon: forecasts [B, horizon]} of one batch: one roll-out for every horizon with our model; a model with
    only `forecast` (remote code) takes no padding (`lengths_B` None) and rolls out once per horizon."""
    if isinstance(model, TimeMoeForPrediction):
        return roll_out(model, context_BT, horizons, lengths_B)
    if lengths_B is not None:
        raise ValueError(f"{type(model).__name__} forecasts rows of one length only")
    with torch.no_grad():
        return {h: model.forecast(context_BT, h) for h in horizons}


def forecast_contexts(model, contexts: Contexts | Sequence[np.ndarray], horizons: Sequence[int], batch_size: int,
                      bar=None) -> dict[int, np.ndarray]:
    """{horizon: forecasts [N, horizon] float32}, rows in the order of `contexts` (a `Contexts`, or 1-D arrays of
    finite values, at least one point each). `bar`: anything with `update(n)`, advanced by the contexts done."""
    if not isinstance(contexts, Contexts):
        contexts = Contexts.of(contexts)
    horizons = sorted({int(h) for h in horizons})
    out = {h: np.empty((len(contexts), h), dtype=np.float32) for h in horizons}
    if not len(contexts):
        return out
    lengths_N = contexts.lengths_N
    device = next(model.parameters()).device
    for rows in length_batches(lengths_N, batch_size, same_length=not isinstance(model, TimeMoeForPrediction)):
        context_BT = torch.from_numpy(contexts.padded(rows)).to(device)
        lengths_B = lengths_N[rows]
        padded = int(lengths_B.min()) < context_BT.shape[1]
        forecasts = forecast_batch(model, context_BT, horizons, torch.from_numpy(lengths_B) if padded else None)
        for h in horizons:
            out[h][rows] = forecasts[h].float().cpu().numpy()
        if bar is not None:
            bar.update(len(rows))
    return out


def auto_batch_size(model, context_length: int, horizon: int, most: int = 4096) -> int:
    """Series per roll-out from the working memory of one (each row's KV cache over the whole roll-out, plus the
    activations of its context pass: a padding mask, the widest projections). On a CPU ~32 MiB, at least 8 rows: a
    batch that stays in the caches is the fastest (per CPU-second, one thread: the demo's model at context 512 does
    85 series in batches of 8, 42 in batches of 256; the tiny one at context 64 about 5,000 in batches of 64-128,
    3,400 at 1,024, 2,000 at 4,096). On a GPU a quarter of its free memory: it wants all the rows it can hold."""
    c = model.config  # ours or a remote-code model's: the released config's names
    param = next(model.parameters())
    least, budget = 8, 32 << 20
    if param.device.type == "cuda":
        least, budget = 1, torch.cuda.mem_get_info(param.device)[0] / 4
    width = param.element_size()
    heads, layers, hidden = c.num_attention_heads, c.num_hidden_layers, c.hidden_size
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    cache = layers * 2 * kv_heads * (hidden // heads) * (context_length + horizon) * width
    ffn = c.intermediate_size * (1 if getattr(c, "use_dense", False) else 2)  # top-k experts of I/k, shared I
    context_pass = context_length * (context_length + (8 * hidden + 3 * ffn) * width)
    return int(max(least, min(most, budget // (cache + context_pass))))
