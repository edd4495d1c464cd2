"""Reference forecasters reported next to the model, on the same windows: [B, T] contexts -> [B, H] forecasts."""

from __future__ import annotations

import torch


def last_value(context_BT: torch.Tensor, horizon: int) -> torch.Tensor:
    return context_BT[:, -1:].expand(-1, horizon)


def seasonal_naive(context_BT: torch.Tensor, horizon: int, season_length: int) -> torch.Tensor:
    """Repeat the last full season: forecast[h] = context[T - m + (h mod m)]."""
    if context_BT.shape[1] < season_length:
        raise ValueError(f"seasonal naive needs a context of at least one season ({season_length}), "
                         f"got {context_BT.shape[1]}")
    last_season_Bm = context_BT[:, -season_length:]
    repeats = -(-horizon // season_length)
    return last_season_Bm.repeat(1, repeats)[:, :horizon]
