"""The paper's long-horizon benchmark: univariate forecasts of every channel over stride-1 test windows, MSE/MAE
on train-split-scaled values and MASE, for one or more models next to seasonal-naive and last-value baselines on
the very same windows; one or more CSVs in one call (`evaluate_many`). Each (model, CSV) pair also gets its
leakage status: whether the CSV was kept out of the model's training corpus (`leakage.py`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..forecast import load_model
from .baselines import last_value, seasonal_naive
from .data import DEFAULT_RATIOS, EvalError, Series, fit_scaler, num_test_windows, read_csv, split_borders, window_starts
from .leakage import leakage_report

BASELINES = ("seasonal_naive", "last_value")


def pair_horizons(horizons, context_lengths) -> list[tuple[int, int]]:
    """(horizon, context length) pairs: one context per horizon, or a single context for all of them."""
    horizons, context_lengths = [int(h) for h in horizons], [int(c) for c in context_lengths]
    if len(context_lengths) == 1:
        context_lengths = context_lengths * len(horizons)
    if not horizons or len(context_lengths) != len(horizons):
        raise EvalError(f"--horizons {horizons} and --context-lengths {context_lengths}: give one context length "
                        "per horizon, or a single one for all")
    if min(horizons + context_lengths) < 1:
        raise EvalError(f"--horizons {horizons} / --context-lengths {context_lengths}: must be positive")
    return list(zip(horizons, context_lengths))


def model_items(models) -> list[tuple[str, object]]:
    """(label, model) pairs. `models`: one model (an HF-layout directory or a loaded model with `forecast`),
    labelled "model"; a list of them, labelled by directory name; or a mapping label -> model."""
    if isinstance(models, Mapping):
        items = [(str(label), m) for label, m in models.items()]
    elif isinstance(models, (str, Path)) or hasattr(models, "forecast"):
        items = [("model", models)]
    else:
        names = [Path(m).name if isinstance(m, (str, Path)) else type(m).__name__ for m in models]
        if len(set(names)) < len(names):  # e.g. several runs' "hf" folders: name them by their whole path
            names = [str(m) for m in models]
        items = list(zip(names, models))
    labels = [label for label, _ in items]
    if not items or len(set(labels)) < len(labels) or set(labels) & set(BASELINES):
        raise EvalError(f"models {labels}: give at least one, with distinct labels other than {BASELINES}")
    return items


def describe_models(models) -> dict[str, str]:
    return {label: str(m) if isinstance(m, (str, Path)) else type(m).__name__ for label, m in model_items(models)}


def named_models(models, backend: str = "native", device: str = "cpu", dtype: str = "float32") -> dict:
    """Label -> loaded model (see `model_items`)."""
    return {label: load_model(m, backend, device, dtype) if isinstance(m, (str, Path)) else m
            for label, m in model_items(models)}


def evaluate_many(models, csvs, *, out_dir: str | Path | None = None, backend: str = "native",
                  device: str = "cpu", dtype: str = "float32", **options) -> dict:
    """Every model on every CSV (each model loaded once): {"models", "datasets": [per-CSV results]}; with
    `out_dir`, one combined results.json / results.md and one forecasts_<dataset>.png per CSV."""
    record = describe_models(models)
    nets = named_models(models, backend, device, dtype)
    if isinstance(csvs, (str, Path)):
        csvs = [csvs]
    if not csvs:
        raise EvalError("no CSV given (--csv)")
    datasets = [evaluate_long_horizon(nets, csv, backend=backend, device=device, dtype=dtype, **options)
                for csv in csvs]
    names = [d["dataset"] for d in datasets]
    if len(set(names)) < len(names):
        raise EvalError(f"CSVs {[str(c) for c in csvs]}: two share the name {names}; the report needs distinct stems")
    for d in datasets:
        d["models"] = record
        # `nets` no longer know their folders
        d["leakage"] = leakage_report(model_items(models), Path(d["csv"]), d["borders"]["test"][0], d["length"])
    results = {"models": record, "datasets": datasets}
    if out_dir is not None:
        from .report import write_report

        results["files"] = {k: str(v) for k, v in write_report(results, out_dir).items()}
    return results


def evaluate_long_horizon(model, csv: str | Path, *, horizons=(96, 192, 336, 720),
                          context_lengths=(512, 1024, 2048, 3072), columns: list[str] | None = None,
                          date_column: str | None = None, max_windows: int | None = None, batch_size: int = 64,
                          season_length: int | None = None, split_ratios=DEFAULT_RATIOS,
                          ett_rows_per_hour: float | None = None, device: str = "cpu",
                          dtype: str = "float32", backend: str = "native", out_dir: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Evaluate `model` (see `named_models`: one, a list or a mapping) on `csv` (a path, or channels already read
    as a `Series`: its `path` is what the leakage status hashes). Returns the results dict; with
    `out_dir`, also writes results.json, results.md and forecasts_<dataset>.png. `ett_rows_per_hour`: the ETT
    borders at that sampling rate whatever the file's name (by default ETT stems get them, others `split_ratios`)."""
    started = time.perf_counter()
    pairs = pair_horizons(horizons, context_lengths)
    series = csv if isinstance(csv, Series) else read_csv(csv, columns, date_column)
    source = str(series.path)
    borders = split_borders(len(series.values_TC), series.dataset, tuple(split_ratios), source, ett_rows_per_hour)
    season = season_length or series.season_length
    if season is None:
        told = f"its {series.date_column!r} column" if series.date_column else "a date column (none found)"
        raise EvalError(f"{source}: the season length of the seasonal-naive baseline cannot be told from {told}; "
                        "pass --season-length")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: must be at least 1")
    if min(c for _, c in pairs) < season:
        raise EvalError(f"--context-lengths {[c for _, c in pairs]}: each must cover one season ({season} rows)")
    starts = {pair: window_starts(borders, pair[1], pair[0], max_windows, source) for pair in pairs}
    mean_C, std_C = fit_scaler(series.values_TC, borders)
    scaled_CT = ((series.values_TC - mean_C) / std_C).T.astype(np.float32)

    nets = named_models(model, backend, device, dtype)
    rows, samples = [], []
    with tqdm(total=sum(len(s) for s in starts.values()) * scaled_CT.shape[0], unit="window",
              disable=not progress, desc=f"eval {series.dataset}") as bar:
        for (horizon, context_len), start_N in starts.items():
            forecasters = make_forecasters(nets, horizon, season)
            metrics = score(forecasters, scaled_CT, start_N, context_len, horizon, season, batch_size, bar)
            rows.append({"horizon": horizon, "context_length": context_len,
                         "windows_per_channel": num_test_windows(borders, horizon),
                         "windows_evaluated_per_channel": len(start_N), "metrics": metrics})
            samples.append(_sample(scaled_CT[-1], int(start_N[len(start_N) // 2]), context_len, horizon,
                                   forecasters))

    results = {
        "dataset": series.dataset, "csv": source,
        "models": describe_models(model),
        "leakage": leakage_report(model_items(model), series.path, borders.test[0], len(series.values_TC)),
        "length": len(series.values_TC),  # rows of each channel
        "backend": backend, "dtype": dtype, "columns": series.columns, "season_length": season,
        "borders": {"train": list(borders.train), "val": list(borders.val), "test": list(borders.test)},
        "scaler": {"mean": mean_C.tolist(), "std": std_C.tolist()},
        "max_windows": max_windows,
        "subsampling": None if max_windows is None else
        "per (horizon, channel): windows floor(k*(n-1)/(N-1)), k = 0..N-1, of the n stride-1 test windows",
        "forecasters": list(forecasters),
        "rows": rows,
        "average": {name: {m: float(np.mean([r["metrics"][name][m] for r in rows])) for m in METRICS}
                    for name in forecasters},
        "samples": samples,
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    if out_dir is not None:
        from .report import write_report

        results["files"] = {k: str(v) for k, v in
                            write_report({"models": results["models"], "datasets": [results]}, out_dir).items()}
    return results


def make_forecasters(nets: dict, horizon: int, season: int) -> dict:
    """Name -> function from contexts [B, T] to forecasts [B, horizon]: the models, then the baselines."""
    out = {label: (lambda ctx, net=net: net.forecast(ctx, horizon)) for label, net in nets.items()}
    out["seasonal_naive"] = lambda ctx: seasonal_naive(ctx, horizon, season)
    out["last_value"] = lambda ctx: last_value(ctx, horizon)
    return out


METRICS = ("mse", "mae", "mase")


def score(forecasters: dict, scaled_CT: np.ndarray, start_N: np.ndarray, context_len: int, horizon: int,
          season: int, batch_size: int, bar) -> dict:
    """MSE and MAE of each forecaster over every (channel, window) pair, batched across channels; MASE: each
    window's MAE over the mean absolute seasonal difference of its own context, averaged over windows (those with
    a flat context, a zero scale, left out)."""
    sums = {name: torch.zeros(3, dtype=torch.float64) for name in forecasters}  # squared, absolute, scaled errors
    channel_M = np.repeat(np.arange(scaled_CT.shape[0]), len(start_N))
    start_M = np.tile(start_N, scaled_CT.shape[0])
    offsets_W = np.arange(context_len + horizon)
    scaled_windows = 0
    for b in range(0, len(start_M), batch_size):
        windows_BW = torch.from_numpy(
            scaled_CT[channel_M[b:b + batch_size, None], start_M[b:b + batch_size, None] + offsets_W])
        context_BT, truth_BH = windows_BW[:, :context_len], windows_BW[:, context_len:].double()
        context64_BT = context_BT.double()
        scale_B = (context64_BT[:, season:] - context64_BT[:, :-season]).abs().mean(dim=1)
        ok_B = scale_B > 0
        scaled_windows += int(ok_B.sum())
        for name, forecast in forecasters.items():
            err_BH = forecast(context_BT).to("cpu", torch.float64) - truth_BH
            mase_B = err_BH.abs().mean(dim=1)[ok_B] / scale_B[ok_B]
            sums[name] += torch.stack([err_BH.pow(2).sum(), err_BH.abs().sum(), mase_B.sum()])
        bar.update(len(windows_BW))
    count = len(start_M) * horizon
    return {name: {"mse": (s[0] / count).item(), "mae": (s[1] / count).item(),
                   "mase": (s[2] / scaled_windows).item() if scaled_windows else float("nan")}
            for name, s in sums.items()}


def _sample(series_T: np.ndarray, start: int, context_len: int, horizon: int, forecasters) -> dict:
    """One window of the last channel, for the plot: the context's tail, the truth and every forecast."""
    window = torch.from_numpy(series_T[start:start + context_len + horizon])
    context_1T = window[None, :context_len]
    tail = min(context_len, 2 * horizon)
    return {"horizon": horizon, "forecast_row": start + context_len,
            "context_tail": window[context_len - tail:context_len].tolist(),
            "truth": window[context_len:].tolist(),
            "forecasts": {name: f(context_1T)[0].float().cpu().tolist() for name, f in forecasters.items()}}
