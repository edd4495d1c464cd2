"""The reference `timemoe-eval gift-eval` must equal, assembled as GIFT-Eval's notebooks assemble it, from the
libraries themselves (gift_eval is not on PyPI; its facts are written out here, independently of
data_prep/gift_eval.py): the test data of its `Dataset` (gluonts' ProcessDataEntry, per-variate series,
`split` + `generate_instances`), predictors in gluonts' protocol (the released-style Time-MoE code loaded through
transformers' trust_remote_code, one window at a time; statsforecast's StatsForecast with SeasonalNaive as its
naive notebook wraps it), and gluonts' `evaluate_model` with the leaderboard's metrics."""

import math
import warnings

import numpy as np
import pandas as pd
import torch
from gluonts.dataset.common import ProcessDataEntry
from gluonts.dataset.split import split
from gluonts.ev.metrics import MAE, MAPE, MASE, MSE, MSIS, ND, NRMSE, RMSE, SMAPE, MeanWeightedSumQuantileLoss
from gluonts.model import evaluate_model
from gluonts.model.forecast import QuantileForecast
from gluonts.time_feature import get_seasonality, norm_freq_str
from gluonts.transform.feature import LastValueImputation

QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
KEYS = ["mean", *map(str, QUANTILES)]
MED_LONG = {"taylor/30T", "taylor/H"}  # the suite's sub-daily configurations


def gift_prediction_length(name: str, freq: str, term: str) -> int:
    unit = norm_freq_str(pd.tseries.frequencies.to_offset(freq).name)
    unit = {"Y": "A", "YE": "A", "QE": "Q", "ME": "M", "h": "H", "min": "T", "s": "S"}.get(unit, unit)
    base = ({"A": 6, "Q": 8, "M": 18, "W": 13, "D": 14, "H": 48} if "m4" in name else
            {"M": 12, "W": 8, "D": 30, "H": 48, "T": 48, "S": 60})[unit]
    return {"short": 1, "medium": 10, "long": 15}[term] * base


def gift_windows(name: str, hf, prediction_length: int) -> int:
    if "m4" in name:
        return 1
    first = [row["target"] if row["target"].ndim == 1 else row["target"][0] for row in hf]
    return min(max(1, math.ceil(0.1 * min(len(t) for t in first) / prediction_length)), 20)


def gift_test_data(path, name: str, term: str):
    """(test data, prediction length, freq) of GIFT-Eval's Dataset(name, term, to_univariate=multivariate)."""
    import datasets

    hf = datasets.load_from_disk(str(path)).with_format("numpy")
    freq = hf[0]["freq"]
    one_dim = hf[0]["target"].ndim == 1
    process = ProcessDataEntry(freq, one_dim_target=one_dim)
    entries = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for row in hf:
            entry = process({**row, "start": row["start"].item()})
            if one_dim:
                entries.append(entry)
            else:
                entries += [{**entry, "target": v, "item_id": f"{entry['item_id']}_dim{i}"}
                            for i, v in enumerate(entry["target"])]
    pl = gift_prediction_length(name, freq, term)
    w = gift_windows(name, hf, pl)
    _, template = split(entries, offset=-pl * w)
    return template.generate_instances(prediction_length=pl, windows=w, distance=pl), pl, freq


def leaderboard_metrics():
    return [MSE(forecast_type="mean"), MSE(forecast_type=0.5), MAE(), MASE(), MAPE(), SMAPE(), MSIS(), RMSE(),
            NRMSE(), ND(), MeanWeightedSumQuantileLoss(quantile_levels=QUANTILES)]


def imputed(entry) -> np.ndarray:
    target = np.asarray(entry["target"], np.float32)
    return LastValueImputation()(target.copy()) if np.isnan(target).any() else target


class ReleasedTimeMoe:
    """Each window alone: the last `context_length` imputed points, the released-style code's `forecast`; the
    point stands for the mean and every quantile."""

    def __init__(self, model, prediction_length: int, context_length: int):
        self.model, self.pl, self.n = model, prediction_length, context_length

    def predict(self, dataset, **kwargs):
        for entry in dataset:
            context = torch.from_numpy(imputed(entry)[-self.n:].copy())[None]
            with torch.no_grad():
                point = self.model.forecast(context, self.pl)[0].float().numpy()
            yield QuantileForecast(np.repeat(point[None], len(KEYS), axis=0), forecast_keys=KEYS,
                                   start_date=entry["start"] + len(entry["target"]), item_id=entry["item_id"])


class NotebookSeasonalNaive:
    """GIFT-Eval's naive notebook's StatsForecastPredictor with SeasonalNaive: every window's imputed history as
    one DataFrame, `StatsForecast.forecast` with levels 20/40/60/80. The notebook also asks for level 0, the 0.5
    quantile's (mean - 0 sigma); statsforecast 2.x refuses 0, so the point column stands for it."""

    def __init__(self, prediction_length: int, season_length: int, freq: str):
        from statsforecast import StatsForecast
        from statsforecast.models import SeasonalNaive

        self.pl, self.freq = prediction_length, freq
        self.sf = StatsForecast(models=[SeasonalNaive(season_length=season_length)], freq=freq)
        self.columns = ["SeasonalNaive"] + [
            f"SeasonalNaive-{'hi' if q > 0.5 else 'lo'}-{round(200 * (max(q, 1 - q) - 0.5))}" if q != 0.5 else
            "SeasonalNaive" for q in QUANTILES]

    def predict(self, dataset, **kwargs):
        entries = list(dataset)
        frames = []
        for k, entry in enumerate(entries):
            target = imputed(entry)
            start = entry["start"]
            frames.append(pd.DataFrame({"unique_id": f"w{k:06d}", "y": target, "ds": pd.date_range(
                start=start.to_timestamp(), periods=len(target), freq=start.freq)}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = self.sf.forecast(df=pd.concat(frames), h=self.pl, level=[20, 40, 60, 80])
        by_id = dict(iter(result.groupby("unique_id")))
        for k, entry in enumerate(entries):
            rows = by_id[f"w{k:06d}"]
            yield QuantileForecast(np.stack([rows[c].to_numpy() for c in self.columns]), forecast_keys=KEYS,
                                   start_date=entry["start"] + len(entry["target"]), item_id=entry["item_id"])


def seasonality(freq: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_seasonality(freq)


def gift_evaluate(predictor, test_data, freq: str) -> dict[str, float]:
    table = evaluate_model(predictor, test_data=test_data, metrics=leaderboard_metrics(), axis=None,
                           mask_invalid_label=True, allow_nan_forecast=False, seasonality=seasonality(freq))
    return {k: float(v.iloc[0]) for k, v in table.items()}
