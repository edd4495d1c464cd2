"""The leaderboard's Seasonal_Naive: statsforecast's SeasonalNaive on each window's whole imputed history (float32,
as GIFT-Eval's StatsForecast wrapper passes it), its normal prediction intervals at levels 20/40/60/80 giving the
quantiles 0.4/0.3/0.2/0.1 (lower ends) and 0.6/0.7/0.8/0.9 (upper ends), the point forecast the mean and the 0.5."""

from __future__ import annotations

import warnings

import numpy as np

from .scores import KEYS

LEVELS = (20, 40, 60, 80)
# Where each of KEYS (mean, 0.1 … 0.9) comes from in statsforecast's output.
SOURCES = ("mean", "lo-80", "lo-60", "lo-40", "lo-20", "mean", "hi-20", "hi-40", "hi-60", "hi-80")
assert len(SOURCES) == len(KEYS)


def seasonal_naive(histories: list[np.ndarray], horizon: int, season_length: int) -> np.ndarray:
    """[N, 10, horizon]: per history, the mean then the quantiles 0.1 … 0.9. A history shorter than the season
    leaves NaN where it has no point to repeat (scoring refuses those)."""
    from statsforecast.models import SeasonalNaive

    model = SeasonalNaive(season_length=season_length)
    out = np.empty((len(histories), len(KEYS), horizon), dtype=np.float32)
    with warnings.catch_warnings():  # its notice for a history shorter than the season: scoring names the window
        warnings.simplefilter("ignore", UserWarning)
        for i, history in enumerate(histories):
            forecast = model.forecast(y=history, h=horizon, level=list(LEVELS))
            out[i] = [forecast[s] for s in SOURCES]
    return out
