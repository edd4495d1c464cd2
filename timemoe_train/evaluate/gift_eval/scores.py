"""Forecasts of one configuration's windows -> the leaderboard's eleven metrics, computed by gluonts exactly as
GIFT-Eval's notebooks call it: `evaluate_model`'s evaluation (`evaluate_forecasts`, what it runs after predicting)
with axis=None, invalid labels masked, NaN forecasts refused, and the frequency's gluonts seasonality for MASE.

A forecast is a gluonts QuantileForecast: its mean and the nine quantiles 0.1 … 0.9. Time-MoE gives one point
forecast, which stands for all ten.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from .windows import Windows

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KEYS = ("mean", *(str(q) for q in QUANTILES))


def leaderboard_metrics() -> list:
    from gluonts.ev.metrics import MAE, MAPE, MASE, MSE, MSIS, ND, NRMSE, RMSE, SMAPE, MeanWeightedSumQuantileLoss

    return [MSE(forecast_type="mean"), MSE(forecast_type=0.5), MAE(), MASE(), MAPE(), SMAPE(), MSIS(), RMSE(),
            NRMSE(), ND(), MeanWeightedSumQuantileLoss(quantile_levels=list(QUANTILES))]


def seasonality(freq: str) -> int:
    from gluonts.time_feature import get_seasonality

    with warnings.catch_warnings():  # pandas' notices about the old aliases GIFT-Eval's data is written with
        warnings.simplefilter("ignore", FutureWarning)
        return get_seasonality(freq)


def score(windows: Windows, forecasts_NKH: np.ndarray) -> dict[str, float]:
    """`forecasts_NKH`: per window, the mean then the nine quantiles ([N, 10, H]), or one point forecast ([N, H])."""
    from gluonts.model.evaluation import evaluate_forecasts
    from gluonts.model.forecast import QuantileForecast

    if forecasts_NKH.ndim == 2:
        forecasts_NKH = np.broadcast_to(forecasts_NKH[:, None], (len(windows), len(KEYS), forecasts_NKH.shape[1]))
    forecasts = (QuantileForecast(forecasts_NKH[i], start_date=label["start"], forecast_keys=list(KEYS),
                                  item_id=label["item_id"]) for i, label in enumerate(windows.label))
    season = seasonality(windows.config.freq)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar, one per call, that no option turns off
        table = evaluate_forecasts(forecasts, test_data=windows, metrics=leaderboard_metrics(), axis=None,
                                   mask_invalid_label=True, allow_nan_forecast=False, seasonality=season)
    return {k: float(v) for k, v in table.iloc[0].items()}
