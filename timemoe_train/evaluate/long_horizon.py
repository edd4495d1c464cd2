"""The paper's long-horizon benchmark: univariate forecasts of every channel over stride-1 test windows, MSE/MAE
on train-split-scaled values and MASE, for one or more models next to seasonal-naive and last-value baselines on
the very same windows; one or more tables in one call (`evaluate_many`). Each (model, table) pair also gets its
leakage status: whether the table was kept out of the model's training corpus (`leakage.py`).

Missing points (empty cells, NA, rows missing from the table's time grid: what timemoe-prep reads as missing):
each window's context is filled from the points up to its end alone, interior gaps linearly as timemoe-forecast
fills them, a gap at its start or end held at the nearest real point (the forecast starts where the truth starts,
and the truth is never seen); the scaler is fitted on the real points of the train split. Missing truth points are
left out of MSE, MAE and MASE, and so is a window with no real point in its context or none in its truth; each
row of the results counts what was filled and left out (`gaps`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep.sources.tabular import TableLayout
from ..forecast import load_model
from ..forecast.batched import forecast_batch
from .baselines import last_value, seasonal_naive
from .data import (DEFAULT_RATIOS, Borders, EvalError, Series, fit_scaler, num_test_windows, read_table, split_borders,
                   window_starts)
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


def read_datasets(csvs, columns: list[str] | None = None, date_column: str | None = None,
                  id_columns: list[str] | None = None, value_columns: list[str] | None = None,
                  freq: str | None = None) -> list[Series]:
    """Every dataset of the tables `csvs` (paths, or channels already read as `Series`), as timemoe-prep reads
    them: a table whose series differ in length gives one dataset per length."""
    if isinstance(csvs, (str, Path, Series)):
        csvs = [csvs]
    if not csvs:
        raise EvalError("no table given (--csv)")
    layout = TableLayout(tuple(id_columns) if id_columns else None, date_column,
                         tuple(value_columns) if value_columns else None)
    return [d for csv in csvs for d in ([csv] if isinstance(csv, Series) else read_table(csv, columns, layout, freq))]


READING = ("columns", "date_column", "id_columns", "value_columns", "freq")  # read_datasets' options
PLANNING = ("horizons", "context_lengths", "max_windows", "batch_size", "season_length", "split_ratios",
            "ett_rows_per_hour")  # plan_windows'


def evaluate_many(models, csvs, *, out_dir: str | Path | None = None, backend: str = "native",
                  device: str = "cpu", dtype: str = "float32", **options) -> dict:
    """Every model on every dataset of every table (each model loaded once): {"models", "datasets": [per-dataset
    results]}; with `out_dir`, one combined results.json / results.md and one forecasts_<dataset>.png each.
    `options`: `read_datasets`' and `evaluate_long_horizon`'s."""
    record = describe_models(models)
    datasets = read_datasets(csvs, **{k: options.pop(k) for k in READING if k in options})
    names = [d.dataset for d in datasets]
    if len(set(names)) < len(names):
        raise EvalError(f"tables {sorted({str(d.path) for d in datasets})}: two datasets share the name {names}; the "
                        "report needs distinct stems")
    # every dataset checked before any model is loaded
    plans = [plan_windows(d, **{k: options[k] for k in PLANNING if k in options}) for d in datasets]
    nets = named_models(models, backend, device, dtype)
    results = {"models": record, "datasets": [evaluate_long_horizon(nets, plan, backend=backend, device=device,
                                                                    dtype=dtype, **options) for plan in plans]}
    for d in results["datasets"]:
        d["models"] = record
        # `nets` no longer know their folders
        d["leakage"] = leakage_report(model_items(models), Path(d["csv"]), d["borders"]["test"][0], d["length"])
    if out_dir is not None:
        from .report import write_report

        results["files"] = {k: str(v) for k, v in write_report(results, out_dir).items()}
    return results


@dataclass
class EvalWindows:
    """One dataset ready to be scored: everything about it checked that needs no model."""

    series: Series
    borders: Borders
    season: int
    starts: dict[tuple[int, int], np.ndarray]  # (horizon, context length) -> first row of each window's context
    mean_C: np.ndarray
    std_C: np.ndarray
    scaled_CT: np.ndarray  # float32, train-split scaled, NaN where missing: the truth
    filled_CT: np.ndarray  # float32, interior gaps filled linearly, the ends held at the nearest real point
    last_real_CT: np.ndarray  # int64: the last row at or before each with a real point, -1 before the first


def plan_windows(series: Series, *, horizons=(96, 192, 336, 720), context_lengths=(512, 1024, 2048, 3072),
                 max_windows: int | None = None, batch_size: int = 64, season_length: int | None = None,
                 split_ratios=DEFAULT_RATIOS, ett_rows_per_hour: float | None = None) -> EvalWindows:
    """The borders, windows and scaling of `series` under the protocol; EvalError names what does not fit."""
    pairs = pair_horizons(horizons, context_lengths)
    source = str(series.path)
    borders = split_borders(len(series.values_TC), series.dataset, tuple(split_ratios), source, ett_rows_per_hour)
    season = season_length or series.season_length
    if season is None:
        raise EvalError(f"{source}: the season length of the seasonal-naive baseline cannot be told from its "
                        f"timestamps (frequency {series.freq!r}); pass --season-length")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: must be at least 1")
    if min(c for _, c in pairs) < season:
        raise EvalError(f"--context-lengths {[c for _, c in pairs]}: each must cover one season ({season} rows)")
    starts = {pair: window_starts(borders, pair[1], pair[0], max_windows, source) for pair in pairs}
    mean_C, std_C = fit_scaler(series, borders)
    scaled_CT = ((series.values_TC - mean_C) / std_C).T.astype(np.float32)
    real_CT = np.isfinite(scaled_CT)
    rows_T = np.arange(scaled_CT.shape[1])
    filled_CT = np.stack([np.where(real, x, np.interp(rows_T, rows_T[real], x[real]))
                          for x, real in zip(scaled_CT, real_CT)]).astype(np.float32)
    last_real_CT = np.maximum.accumulate(np.where(real_CT, rows_T, -1), axis=1)
    return EvalWindows(series, borders, season, starts, mean_C, std_C, scaled_CT, filled_CT, last_real_CT)


def evaluate_long_horizon(model, csv, *, horizons=(96, 192, 336, 720),
                          context_lengths=(512, 1024, 2048, 3072), columns: list[str] | None = None,
                          date_column: str | None = None, id_columns: list[str] | None = None,
                          value_columns: list[str] | None = None, freq: str | None = None,
                          max_windows: int | None = None, batch_size: int = 64,
                          season_length: int | None = None, split_ratios=DEFAULT_RATIOS,
                          ett_rows_per_hour: float | None = None, device: str = "cpu",
                          dtype: str = "float32", backend: str = "native", out_dir: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Evaluate `model` (see `named_models`: one, a list or a mapping) on `csv`: a path to a table holding one
    dataset (series of one length), channels already read as a `Series` (its `path` is what the leakage status
    hashes) or a `plan_windows` result. Returns the results dict; with `out_dir`, also writes results.json,
    results.md and forecasts_<dataset>.png. `ett_rows_per_hour`: the ETT borders at that sampling rate whatever
    the file's name (by default ETT stems get them, others `split_ratios`)."""
    started = time.perf_counter()
    if isinstance(csv, EvalWindows):
        plan = csv
    else:
        [series, *more] = read_datasets(csv, columns, date_column, id_columns, value_columns, freq)
        if more:
            raise EvalError(f"{csv}: its series have {len(more) + 1} different lengths: evaluate_many scores each "
                            "length as a dataset of its own")
        plan = plan_windows(series, horizons=horizons, context_lengths=context_lengths, max_windows=max_windows,
                            batch_size=batch_size, season_length=season_length, split_ratios=split_ratios,
                            ett_rows_per_hour=ett_rows_per_hour)
    series, borders = plan.series, plan.borders

    nets = named_models(model, backend, device, dtype)
    forecasters = make_forecasters(nets, plan.season)
    rows, samples = [], []
    with tqdm(total=sum(len(s) for s in shared_starts(plan.starts).values()) * plan.scaled_CT.shape[0],
              unit="window", disable=not progress, desc=f"eval {series.dataset}") as bar:
        scores = score(forecasters, plan, batch_size, bar)
    for (horizon, context_len), start_N in plan.starts.items():
        metrics, gaps = scores[horizon, context_len]
        rows.append({"horizon": horizon, "context_length": context_len,
                     "windows_per_channel": num_test_windows(borders, horizon),
                     "windows_evaluated_per_channel": len(start_N), "metrics": metrics, "gaps": gaps})
        samples.append(_sample(plan, int(start_N[len(start_N) // 2]), context_len, horizon, forecasters))

    results = {
        "dataset": series.dataset, "csv": str(series.path),
        "models": describe_models(model),
        "leakage": leakage_report(model_items(model), series.path, borders.test[0], len(series.values_TC)),
        "length": len(series.values_TC),  # rows of each channel
        "backend": backend, "dtype": dtype, "columns": series.columns, "season_length": plan.season,
        "borders": {"train": list(borders.train), "val": list(borders.val), "test": list(borders.test)},
        "scaler": {"mean": plan.mean_C.tolist(), "std": plan.std_C.tolist()},
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


def make_forecasters(nets: dict, season: int) -> dict:
    """Name -> function from contexts [B, T] and horizons to {horizon: forecasts [B, horizon]}: the models (one
    roll-out for all the horizons, `forecast_batch`), then the baselines."""
    out = {label: (lambda ctx, hs, net=net: forecast_batch(net, ctx, hs)) for label, net in nets.items()}
    out["seasonal_naive"] = lambda ctx, hs: {h: seasonal_naive(ctx, h, season) for h in hs}
    out["last_value"] = lambda ctx, hs: {h: last_value(ctx, h) for h in hs}
    return out


METRICS = ("mse", "mae", "mase")


def contexts(plan: EvalWindows, channel_B: np.ndarray, start_B: np.ndarray, context_len: int):
    """Each window's context, filled from the points up to its end alone (see the module docstring), and whether
    it holds a real point at all."""
    rows_BT = start_B[:, None] + np.arange(context_len)
    last_B = plan.last_real_CT[channel_B, start_B + context_len - 1]
    held_BT = rows_BT > last_B[:, None]  # after the last real point: held at it (interp would read the truth)
    context_BT = np.where(held_BT, plan.filled_CT[channel_B, np.maximum(last_B, 0)][:, None],
                          plan.filled_CT[channel_B[:, None], rows_BT])
    return torch.from_numpy(context_BT), last_B >= start_B


def shared_starts(starts: dict) -> dict[tuple[int, tuple], np.ndarray]:
    """(context length, the (horizon, context length) pairs) -> the window starts all those pairs, and no other of
    that context length, evaluate: the windows one roll-out serves. Horizons share a window only where their
    context is the same; their window sets differ (a longer horizon has fewer test windows; --max-windows spreads
    each set over its own range)."""
    out = {}
    for context_len in sorted({c for _, c in starts}):
        pairs = [p for p in starts if p[1] == context_len]
        union_U = np.unique(np.concatenate([starts[p] for p in pairs]))
        needs_PU = np.stack([np.isin(union_U, starts[p]) for p in pairs])
        for key in np.unique(needs_PU, axis=1).T:
            group = tuple(p for p, needed in zip(pairs, key) if needed)
            out[context_len, group] = union_U[(needs_PU == key[:, None]).all(axis=0)]
    return out


GAPS = ("context_points_filled", "truth_points_missing", "windows_left_out")


def score(forecasters: dict, plan: EvalWindows, batch_size: int, bar) -> dict:
    """(horizon, context length) -> (forecaster -> metrics, gaps). MSE and MAE of each forecaster over every real
    truth point of every (channel, window) pair, batched across channels, every horizon of a window from one
    roll-out; MASE: each window's MAE over the mean absolute seasonal difference of its own context, averaged over
    windows (those with a flat context, a zero scale, left out). The gaps: context points filled, truth points
    missing, windows left out."""
    season, channels = plan.season, plan.scaled_CT.shape[0]
    sums = {pair: {name: torch.zeros(3, dtype=torch.float64) for name in forecasters} for pair in plan.starts}
    counts = {pair: dict.fromkeys(("points", "scaled_windows") + GAPS, 0) for pair in plan.starts}
    for (context_len, pairs), start_N in shared_starts(plan.starts).items():
        horizons = [h for h, _ in pairs]
        channel_M = np.repeat(np.arange(channels), len(start_N))
        start_M = np.tile(start_N, channels)
        for b in range(0, len(start_M), batch_size):
            channel_B, start_B = channel_M[b:b + batch_size], start_M[b:b + batch_size]
            context_BT, seen_B = contexts(plan, channel_B, start_B, context_len)
            context64_BT = context_BT.double()
            scale_B = (context64_BT[:, season:] - context64_BT[:, :-season]).abs().mean(dim=1)
            filled_B = (~np.isfinite(plan.scaled_CT[channel_B[:, None], start_B[:, None] + np.arange(context_len)])
                        ).sum(axis=1)
            truth_BW = torch.from_numpy(plan.scaled_CT[channel_B[:, None], start_B[:, None] + context_len
                                                       + np.arange(max(horizons))]).double()
            forecasts = {name: forecast(context_BT, horizons) for name, forecast in forecasters.items()}
            for pair in pairs:
                horizon, count = pair[0], counts[pair]
                truth_BH = truth_BW[:, :horizon]
                real_BH = torch.isfinite(truth_BH) & torch.from_numpy(seen_B)[:, None]
                n_B = real_BH.sum(dim=1)
                kept_B = n_B > 0
                ok_B = (scale_B > 0) & kept_B
                count["points"] += int(n_B.sum())
                count["scaled_windows"] += int(ok_B.sum())
                count["windows_left_out"] += int((~kept_B).sum())
                count["truth_points_missing"] += int((~real_BH[kept_B]).sum())
                count["context_points_filled"] += int(filled_B[kept_B.numpy()].sum())
                for name in forecasters:
                    err_BH = torch.where(real_BH, forecasts[name][horizon].to("cpu", torch.float64) - truth_BH, 0.0)
                    mase_B = err_BH.abs().sum(dim=1)[ok_B] / n_B[ok_B] / scale_B[ok_B]
                    sums[pair][name] += torch.stack([err_BH.pow(2).sum(), err_BH.abs().sum(), mase_B.sum()])
            bar.update(len(start_B))
    out = {}
    for pair, count in counts.items():
        if not count["points"]:
            raise EvalError(f"{plan.series.path}: no test window at horizon {pair[0]} has a real point in both its "
                            "context and its truth")
        points, scaled = count["points"], count["scaled_windows"]
        out[pair] = ({name: {"mse": (s[0] / points).item(), "mae": (s[1] / points).item(),
                             "mase": (s[2] / scaled).item() if scaled else float("nan")}
                      for name, s in sums[pair].items()},
                     {k: count[k] for k in GAPS})
    return out


def _sample(plan: EvalWindows, start: int, context_len: int, horizon: int, forecasters) -> dict:
    """One window of the last channel, for the plot: the context's tail, the truth and every forecast."""
    channel = len(plan.scaled_CT) - 1
    context_1T, _ = contexts(plan, np.array([channel]), np.array([start]), context_len)
    truth = plan.scaled_CT[channel, start + context_len:start + context_len + horizon]
    tail = min(context_len, 2 * horizon)
    return {"horizon": horizon, "forecast_row": start + context_len,
            "context_tail": context_1T[0, context_len - tail:].tolist(),
            "truth": truth.tolist(),
            "forecasts": {name: f(context_1T, [horizon])[horizon][0].float().cpu().tolist()
                          for name, f in forecasters.items()}}
