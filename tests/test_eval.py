"""timemoe-eval against independent computations: borders, scaling, windows and metrics recomputed here with
pandas and plain loops, one window at a time."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from timemoe_train.evaluate import EvalError, evaluate_long_horizon, evaluate_many
from timemoe_train.forecast import ForecastError  # what a model directory that cannot be loaded raises
from timemoe_train.evaluate.cli import main as eval_main
from timemoe_train.evaluate.report import dataset_rows
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

# The benchmark file beside the checkout (shared/ in CI); the copy the product ships otherwise.
ETTH1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ETTh1.csv"
if not ETTH1.is_file():
    ETTH1 = Path(__file__).resolve().parents[1] / "examples" / "data" / "ETTh1.csv"

HORIZONS, CONTEXTS, N = [96, 192], [128, 64], 4


def tiny_model_dir(folder, seed: int):
    torch.manual_seed(seed)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny"))
    with torch.no_grad():  # forecasts of O(1) rather than ~0, so that the model's metric differs from the mean's
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
    return model.save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), 0)


@pytest.fixture(scope="module")
def etth1_results(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate_long_horizon(model_dir, ETTH1, horizons=HORIZONS, context_lengths=CONTEXTS, max_windows=N,
                                 out_dir=out, progress=False), out


def expected_etth1():
    """The protocol by hand: 12/4/4 months of 30 days, train-split z-scores with the population std."""
    df = pd.read_csv(ETTH1)
    values = df.drop(columns="date")
    train = values.iloc[: 12 * 30 * 24]
    scaled = (values - train.mean()) / train.std(ddof=0)
    return scaled, 12 * 30 * 24 + 4 * 30 * 24, 4 * 30 * 24


def test_borders_scaling_and_window_counts(etth1_results):
    results, _ = etth1_results
    scaled, test_start, test_len = expected_etth1()
    assert results["borders"] == {"train": [0, 8640], "val": [8640, 11520], "test": [11520, 14400]}
    assert results["columns"] == list(scaled.columns)
    train = pd.read_csv(ETTH1).drop(columns="date").iloc[:8640]
    np.testing.assert_allclose(results["scaler"]["mean"], train.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(results["scaler"]["std"], train.std(ddof=0).to_numpy(), rtol=1e-12)
    assert results["season_length"] == 24  # hourly dates
    for row, h, c in zip(results["rows"], HORIZONS, CONTEXTS):
        assert (row["horizon"], row["context_length"]) == (h, c)
        # Stride-1 windows whose forecast lies wholly inside the test split: 2880 - h + 1.
        assert row["windows_per_channel"] == sum(1 for t in range(test_start, test_start + test_len)
                                                 if t + h <= test_start + test_len)
        assert row["windows_evaluated_per_channel"] == N


def chosen_forecast_rows(horizon: int):
    """First forecast row of each evaluated window: N evenly spaced among all, first and last included."""
    _, test_start, test_len = expected_etth1()
    last = test_len - horizon
    return [test_start + int(np.floor(x)) for x in np.linspace(0, last, N)]


def test_model_and_baseline_metrics(etth1_results, model_dir):
    results, _ = etth1_results
    scaled, _, _ = expected_etth1()
    model = TimeMoeForPrediction.from_pretrained(model_dir).eval()
    for row, h, ctx in zip(results["rows"], HORIZONS, CONTEXTS):
        errors = {"model": [], "seasonal_naive": [], "last_value": []}
        mase = {name: [] for name in errors}
        for col in scaled.columns:
            series = scaled[col].to_numpy()
            for t0 in chosen_forecast_rows(h):
                truth = series[t0:t0 + h]
                context = series[t0 - ctx:t0]
                # MASE's scale: the in-sample error of a 24-hour seasonal naive forecast over this context.
                scale = np.mean([abs(context[t] - context[t - 24]) for t in range(24, ctx)])
                seasonal = np.array([series[t0 - 24 + (i % 24)] for i in range(h)])
                model_fc = model.forecast(torch.tensor(context, dtype=torch.float32)[None], h)[0].double().numpy()
                for name, fc in (("model", model_fc), ("seasonal_naive", seasonal),
                                 ("last_value", np.full(h, series[t0 - 1]))):
                    errors[name].append(fc - truth)
                    mase[name].append(np.mean(np.abs(fc - truth)) / scale)
        for name, errs in errors.items():
            e = np.concatenate(errs)
            got = row["metrics"][name]
            np.testing.assert_allclose([got["mse"], got["mae"], got["mase"]],
                                       [np.mean(e ** 2), np.mean(np.abs(e)), np.mean(mase[name])], rtol=2e-5,
                                       err_msg=f"{name} at horizon {h}")
    for name in ("model", "seasonal_naive", "last_value"):
        for m in ("mse", "mae", "mase"):
            assert results["average"][name][m] == pytest.approx(np.mean([r["metrics"][name][m]
                                                                         for r in results["rows"]]))
    assert results["average"]["model"]["mse"] != pytest.approx(results["average"]["last_value"]["mse"], rel=1e-3)


def test_report_files(etth1_results):
    results, out = etth1_results
    written = json.loads((out / "results.json").read_text())
    assert written["datasets"][0]["rows"] == results["rows"] and "samples" not in written["datasets"][0]
    md = (out / "results.md").read_text()
    assert "| ETTh1 | 96 | 128 | 4 of 2785 | Time-MoE |" in md
    assert "| ETTh1 | 192 | 64 | 4 of 2689 | Last value |" in md
    average = results["average"]["seasonal_naive"]
    assert (f"| ETTh1 | **average** |  |  | Seasonal naive (24) | {average['mse']:.4f} | {average['mae']:.4f} | "
            f"{average['mase']:.4f} |") in md
    png = (out / "forecasts_ETTh1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_remote_backend_matches_native(etth1_results, model_dir):
    results, _ = etth1_results
    remote = evaluate_long_horizon(model_dir, ETTH1, horizons=HORIZONS[:1], context_lengths=CONTEXTS[:1],
                                   max_windows=N, backend="remote", progress=False)
    native = results["rows"][0]["metrics"]["model"]
    assert remote["rows"][0]["metrics"]["model"] == pytest.approx(native, rel=1e-4)


def test_ratio_splits_and_season_from_dates(tmp_path, model_dir):
    n = 1000
    t = np.arange(n)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="D").astype(str),
                       "a": np.sin(2 * np.pi * t / 7) + 0.01 * t, "b": np.cos(t / 5.0)})
    csv = tmp_path / "toy.csv"
    df.to_csv(csv, index=False)
    r = evaluate_long_horizon(model_dir, csv, horizons=[24], context_lengths=[96], columns=["a"], max_windows=2,
                              progress=False)
    # 70% train, 20% test, val the rest, as the Time-Series-Library protocol.
    assert r["borders"] == {"train": [0, 700], "val": [700, 800], "test": [800, 1000]}
    assert r["season_length"] == 7 and r["columns"] == ["a"]
    assert r["rows"][0]["windows_per_channel"] == 200 - 24 + 1
    # A weekly sine plus a trend of 0.01/day: seasonal naive repeats the last week, so at step h it lags the trend
    # by 7 * (h // 7 + 1) days.
    scale = df["a"].iloc[:700].std(ddof=0)
    expected_mae = np.mean([0.01 * 7 * (h // 7 + 1) for h in range(24)]) / scale
    assert r["rows"][0]["metrics"]["seasonal_naive"]["mae"] == pytest.approx(expected_mae, rel=1e-4)


def test_bad_inputs_are_named(tmp_path, model_dir):
    with pytest.raises(EvalError, match=r"ETTh1\.csv: column\(s\) \['nope'\] not found .*'OT'"):
        evaluate_long_horizon(model_dir, ETTH1, columns=["OT", "nope"], progress=False)
    short = tmp_path / "ETTh1.csv"
    pd.read_csv(ETTH1).iloc[:10_000].to_csv(short, index=False)
    with pytest.raises(EvalError, match=r"ETTh1\.csv: ETTh1 needs 14400 rows .* has 10000"):
        evaluate_long_horizon(model_dir, short, progress=False)
    with pytest.raises(ForecastError, match="no config.json"):
        evaluate_long_horizon(tmp_path, ETTH1, horizons=[96], context_lengths=[128], max_windows=1, progress=False)
    with pytest.raises(ForecastError, match="model directory not found"):
        evaluate_long_horizon(tmp_path / "missing", ETTH1, horizons=[96], context_lengths=[128], progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("date,x\n2020-01-01 00:00:00,1.0\n2020-01-01 01:00:00,oops\n")
    with pytest.raises(EvalError, match=r"bad\.csv: column 'x', row 2 = 'oops': not a number"):  # as prep says it
        evaluate_long_horizon(model_dir, bad, progress=False)
    with pytest.raises(EvalError, match="one context length per horizon"):
        evaluate_long_horizon(model_dir, ETTH1, horizons=[96, 192], context_lengths=[128, 256, 512])
    with pytest.raises(EvalError, match="context length 20000 reaches before the first row"):
        evaluate_long_horizon(model_dir, ETTH1, horizons=[96], context_lengths=[20000], progress=False)


def test_cli(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert eval_main([str(model_dir), "--csv", str(ETTH1), "--columns", "OT", "--horizons", "8",
                      "--context-lengths", "48", "--max-windows", "2", "--out", str(out), "--no-progress"]) == 0
    assert "| ETTh1 | 8 | 48 | 2 of 2873 | Time-MoE |" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "forecasts_ETTh1.png"}
    # All four horizons by default, each with the paper's context length; --horizons narrows them.
    args = [str(model_dir), "--csv", str(ETTH1), "--columns", "OT", "--max-windows", "1", "--no-progress"]
    assert eval_main([*args, "--out", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "results.json").read_text())["datasets"][0]["rows"]
    assert [(r["horizon"], r["context_length"]) for r in rows] == [(96, 512), (192, 1024), (336, 2048), (720, 3072)]
    assert eval_main([*args, "--horizons", "192", "--out", str(tmp_path / "one")]) == 0
    rows = json.loads((tmp_path / "one" / "results.json").read_text())["datasets"][0]["rows"]
    assert [(r["horizon"], r["context_length"]) for r in rows] == [(192, 1024)]
    capsys.readouterr()
    assert eval_main([str(tmp_path / "nowhere"), "--csv", str(ETTH1)]) == 2
    assert "nowhere: model directory not found" in capsys.readouterr().err
    assert eval_main([str(model_dir), "--csv", str(ETTH1), "--freq", "banana"]) == 2
    assert capsys.readouterr().err == ("timemoe-eval: error: --freq 'banana': not a pandas frequency alias (e.g. h, "
                                       "15min, D, W-MON, MS, ME, QS, YS)\n")


def test_several_models_and_csvs_in_one_call_equal_the_separate_runs(tmp_path, model_dir, capsys):
    """One combined table: its rows are exactly those of one run per (dataset, model), baselines included."""
    other = tiny_model_dir(tmp_path / "other", 1)
    toy = tmp_path / "toy.csv"
    t = np.arange(600)
    pd.DataFrame({"date": pd.date_range("2021-01-01", periods=600, freq="h").astype(str),
                  "OT": np.sin(2 * np.pi * t / 24) + 0.1 * np.cos(t / 7.0)}).to_csv(toy, index=False)
    options = dict(horizons=[24, 48], context_lengths=[96], columns=["OT"], max_windows=3, progress=False)
    out = tmp_path / "combined"
    assert eval_main([str(model_dir), str(other), "--csv", str(ETTH1), str(toy), "--columns", "OT",
                      "--horizons", "24,48", "--context-lengths", "96", "--max-windows", "3", "--out", str(out),
                      "--no-progress"]) == 0
    combined = json.loads((out / "results.json").read_text())
    labels = [model_dir.name, other.name]
    assert list(combined["models"]) == labels and [d["dataset"] for d in combined["datasets"]] == ["ETTh1", "toy"]
    md_rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ETTh1 |")
               or line.startswith("| toy |")]
    expected_rows = []
    for d, csv in zip(combined["datasets"], (ETTH1, toy)):
        for label, path in zip(labels, (model_dir, other)):
            alone = evaluate_long_horizon(path, csv, **options)
            for row, mine in zip(alone["rows"], d["rows"]):
                assert mine["metrics"][label] == row["metrics"]["model"]
                for baseline in ("seasonal_naive", "last_value"):
                    assert mine["metrics"][baseline] == row["metrics"][baseline]
        both = evaluate_many({label: p for label, p in zip(labels, (model_dir, other))}, csv, **options)
        expected_rows += dataset_rows(both["datasets"][0])
    assert md_rows == expected_rows
    assert all((out / f"forecasts_{name}.png").is_file() for name in ("ETTh1", "toy"))
    capsys.readouterr()


@pytest.mark.parametrize("name", ["timestamp", "ds", "datetime"])
def test_the_date_column_is_found_as_prep_finds_its_timestamps(tmp_path, model_dir, name):
    n = 600
    t = np.arange(n)
    csv = tmp_path / "toy.csv"
    pd.DataFrame({name: pd.date_range("2020-01-01", periods=n, freq="D").astype(str),
                  "a": np.sin(2 * np.pi * t / 7), "b": np.cos(t / 5.0)}).to_csv(csv, index=False)
    r = evaluate_long_horizon(model_dir, csv, horizons=[24], context_lengths=[96], max_windows=1, progress=False)
    assert r["season_length"] == 7 and r["columns"] == ["a", "b"]
    with pytest.raises(EvalError, match=rf"toy\.csv: column = 'date': missing; the columns are \['{name}'"):
        evaluate_long_horizon(model_dir, csv, date_column="date", progress=False)


# Gaps: rows of the 600-row toy below (train [0, 420), val [420, 480), test [480, 600)) left empty.
GAPS = {"a": [100, 455, 470, 471, 472, 479, 500, *range(530, 561)], "b": [300, 301, 475, 476, 477, 478, 479,
                                                                       *range(590, 600)]}
GAP_H, GAP_CONTEXT = 24, 48


def gap_frame() -> pd.DataFrame:
    t = np.arange(600)
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"date": pd.date_range("2022-01-01", periods=600, freq="h").strftime("%Y-%m-%d %H:%M:%S"),
                          "a": np.sin(2 * np.pi * t / 24) + 0.2 * rng.standard_normal(600) + 0.002 * t,
                          "b": 5 + np.cos(2 * np.pi * t / 24) + 0.3 * rng.standard_normal(600)})
    for column, rows in GAPS.items():
        frame.loc[rows, column] = np.nan
    return frame


def filled_context(history: np.ndarray, start: int) -> np.ndarray | None:
    """The context [start, len(history)) by the documented rule, one point at a time: real points as they are,
    interior gaps linear between the real points on either side (both before the context's end), a gap after the
    last real point held at it, before the first at the first. None: no real point in the context."""
    real = np.flatnonzero(np.isfinite(history))
    if not np.isfinite(history[start:]).any():
        return None
    out = []
    for p in range(start, len(history)):
        if np.isfinite(history[p]):
            out.append(history[p])
        elif p > real[-1]:
            out.append(history[real[-1]])
        elif p < real[0]:
            out.append(history[real[0]])
        else:
            lo, hi = real[real < p].max(), real[real > p].min()
            out.append(history[lo] + (history[hi] - history[lo]) * (p - lo) / (hi - lo))
    return np.array(out)


def gap_reference(model_dir) -> dict:
    """MSE / MAE / MASE of every stride-1 test window by hand, missing truth points and empty windows left out."""
    frame = gap_frame()
    values = frame[["a", "b"]].to_numpy(np.float64)
    train = values[:420]
    scaled = (values - np.nanmean(train, axis=0)) / np.nanstd(train, axis=0)
    model = TimeMoeForPrediction.from_pretrained(model_dir).eval()
    errors = {"model": [], "seasonal_naive": [], "last_value": []}
    mase = {name: [] for name in errors}
    gaps = {"context_points_filled": 0, "truth_points_missing": 0, "windows_left_out": 0}
    for c in range(2):
        for t0 in range(480, 600 - GAP_H + 1):
            context = filled_context(scaled[:t0, c].astype(np.float32).astype(np.float64), t0 - GAP_CONTEXT)
            truth = scaled[t0:t0 + GAP_H, c].astype(np.float32).astype(np.float64)
            keep = np.isfinite(truth)
            if context is None or not keep.any():
                gaps["windows_left_out"] += 1
                continue
            gaps["context_points_filled"] += int((~np.isfinite(scaled[t0 - GAP_CONTEXT:t0, c])).sum())
            gaps["truth_points_missing"] += int((~keep).sum())
            scale = np.mean(np.abs(context[24:] - context[:-24]))
            with torch.no_grad():
                ours = model.forecast(torch.tensor(context, dtype=torch.float32)[None], GAP_H)[0].double().numpy()
            forecasts = {"model": ours, "seasonal_naive": np.array([context[-24 + (i % 24)] for i in range(GAP_H)]),
                         "last_value": np.full(GAP_H, context[-1])}
            for name, forecast in forecasts.items():
                err = (forecast - truth)[keep]
                errors[name].append(err)
                mase[name].append(np.mean(np.abs(err)) / scale)
    metrics = {name: {"mse": np.mean(np.concatenate(e) ** 2), "mae": np.mean(np.abs(np.concatenate(e))),
                      "mase": np.mean(mase[name])} for name, e in errors.items()}
    return {"metrics": metrics, "gaps": gaps}


def installed_eval(model_dir, table, out, *args):
    command = str(Path(sys.executable).with_name("timemoe-eval"))
    proc = subprocess.run([command, str(model_dir), "--csv", table.name, "--horizons", str(GAP_H),
                           "--context-lengths", str(GAP_CONTEXT), "--out", str(out), "--no-progress", *args],
                          cwd=table.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [dataset] = json.loads((out / "results.json").read_text())["datasets"]
    return dataset


def test_gaps_are_filled_in_contexts_and_left_out_of_the_truth_in_every_layout_prep_reads(tmp_path, model_dir):
    """The same series with gaps as a wide CSV (empty cells), a long CSV (interior gaps as rows missing from the
    hourly grid, the trailing ones as empty values) and a wide Parquet file: one set of scores, the by-hand one."""
    frame = gap_frame()
    frame.to_csv(tmp_path / "wide.csv", index=False)
    long = frame.melt(id_vars="date", var_name="item_id", value_name="value")[["item_id", "date", "value"]]
    trailing = (long.item_id == "b") & (long.date >= frame.date[590])
    long[long.value.notna() | trailing].sample(frac=1.0, random_state=0).to_csv(tmp_path / "long.csv", index=False)
    frame.to_parquet(tmp_path / "wide.parquet", index=False)
    reference = gap_reference(model_dir)
    assert reference["gaps"]["windows_left_out"] == 8  # the truth of a's windows from row 530 to 537: all missing
    # the long table's missing rows are gaps on its hourly grid, which prep infers from its usual step
    for table in ("wide.csv", "long.csv", "wide.parquet"):
        [row] = installed_eval(model_dir, tmp_path / table, tmp_path / table.replace(".", "_"))["rows"]
        assert row["gaps"] == reference["gaps"], table
        for name, want in reference["metrics"].items():
            got = row["metrics"][name]
            np.testing.assert_allclose([got["mse"], got["mae"], got["mase"]], [want["mse"], want["mae"], want["mase"]],
                                       rtol=2e-5, err_msg=f"{table}: {name}")
    md = (tmp_path / "long_csv" / "results.md").read_text()
    assert "Gaps: long, horizon 24: 8 windows left out" in md, md


def test_a_long_table_of_series_of_several_lengths_is_one_dataset_per_length(tmp_path, model_dir):
    rows = []
    for item, n in (("x", 600), ("y", 600), ("z", 400)):
        t = np.arange(n)
        rows.append(pd.DataFrame({"unique_id": item, "ds": pd.date_range("2023-01-01", periods=n, freq="h"),
                                  "y": np.sin(2 * np.pi * t / 24) + 0.01 * t}))
    pd.concat(rows).to_csv(tmp_path / "m.csv", index=False)
    command = str(Path(sys.executable).with_name("timemoe-eval"))
    proc = subprocess.run([command, str(model_dir), "--csv", "m.csv", "--horizons", "24", "--context-lengths", "48",
                           "--max-windows", "3", "--out", "out", "--no-progress"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    datasets = json.loads((tmp_path / "out" / "results.json").read_text())["datasets"]
    assert [(d["dataset"], d["columns"], d["length"]) for d in datasets] == [
        ("m (600 points)", ["x", "y"], 600), ("m (400 points)", ["z"], 400)]
    assert datasets[1]["borders"]["test"] == [320, 400] and datasets[0]["season_length"] == 24


def test_horizons_of_one_context_share_one_roll_out_per_window(tmp_path, model_dir):
    """Horizons with the same context length are scored from one roll-out per window (their window sets differ:
    a longer horizon has fewer), a horizon with another context length from its own; the metrics equal those of
    one evaluation per horizon within 1e-5."""
    n = 600
    t = np.arange(n)
    csv = tmp_path / "toy.csv"
    pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="h").astype(str),
                  "a": np.sin(2 * np.pi * t / 24) + 0.01 * t, "b": np.cos(t / 5.0)}).to_csv(csv, index=False)
    model = TimeMoeForPrediction.from_pretrained(model_dir).eval()
    rows_by_length = {}
    model.model.register_forward_hook(
        lambda m, args, out: rows_by_length.__setitem__(args[0].shape[1], rows_by_length.get(args[0].shape[1], 0)
                                                        + args[0].shape[0]))
    horizons, contexts = [24, 48, 40], [64, 64, 96]
    together = evaluate_long_horizon({"model": model}, csv, horizons=horizons, context_lengths=contexts,
                                     batch_size=256, progress=False)
    windows = {r["horizon"]: r["windows_evaluated_per_channel"] for r in together["rows"]}
    assert windows == {24: 120 - 24 + 1, 48: 120 - 48 + 1, 40: 120 - 40 + 1}  # stride 1 over a 120-row test split
    # Context passes: every window of h24 (h48's are among them) once per channel, h40's on their own; plus the
    # one plotted window of each horizon.
    assert rows_by_length[64] == 2 * windows[24] + 2 and rows_by_length[96] == 2 * windows[40] + 1
    for h, c in zip(horizons, contexts):
        alone = evaluate_long_horizon({"model": model}, csv, horizons=[h], context_lengths=[c], batch_size=256,
                                      progress=False)
        row = next(r for r in together["rows"] if r["horizon"] == h)
        for name, metrics in alone["rows"][0]["metrics"].items():
            for m, value in metrics.items():
                assert row["metrics"][name][m] == pytest.approx(value, rel=1e-5), (h, name, m)

    # --max-windows spreads each horizon's windows over its own range: the first is shared, the rest are not.
    rows_by_length.clear()
    spread = evaluate_long_horizon({"model": model}, csv, horizons=[24, 48], context_lengths=[64], max_windows=3,
                                   batch_size=256, progress=False)
    assert rows_by_length[64] == 2 * (1 + 2 + 2) + 2
    for row, h in zip(spread["rows"], (24, 48)):
        alone = evaluate_long_horizon({"model": model}, csv, horizons=[h], context_lengths=[64], max_windows=3,
                                      progress=False)
        assert row["metrics"]["model"] == pytest.approx(alone["rows"][0]["metrics"]["model"], rel=1e-5)
