"""`timemoe-forecast` as users run it (the installed command, in a subprocess, from outside the checkout): its
output equals the library's `forecast()` on the same contexts, taken here from the files by hand."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

COMMAND = str(Path(sys.executable).parent / "timemoe-forecast")
HORIZON, CONTEXT = 7, 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny")).eval()
    with torch.no_grad():  # O(1) forecasts that depend on the context (see test_remote_code.make_ours)
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
    return model.save_pretrained(tmp_path_factory.mktemp("model"))


def run(model_dir, *args, cwd):
    return subprocess.run([COMMAND, str(model_dir), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def library_forecast(model_dir, contexts: list[np.ndarray]) -> list[np.ndarray]:
    model = TimeMoeForPrediction.from_pretrained(model_dir).eval()
    return [model.forecast(torch.tensor(c, dtype=torch.float32)[None], HORIZON)[0].numpy() for c in contexts]


def walk(n: int, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (10 + rng.standard_normal(n).cumsum()) * scale


def test_wide_csv(model_dir, tmp_path):
    times = pd.date_range("2024-01-01", periods=100, freq="h")
    a, b, c = walk(100, 1, 1.0), walk(100, 2, 1e3), walk(100, 3, 1e-2)
    b[-10:] = np.nan  # series b ends 10 hours earlier
    c[80] = np.nan  # an interior hole, filled linearly
    pd.DataFrame({"date": times.strftime("%Y-%m-%d %H:%M:%S"), "a": a, "b": b, "c": c}).to_csv(
        tmp_path / "wide.csv", index=False)
    proc = run(model_dir, "--input", tmp_path / "wide.csv", "--horizon", HORIZON, "--context-length", CONTEXT,
               "--batch-size", 2, "--out", "out.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 missing points inside the contexts filled linearly" in proc.stderr
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["item_id", "timestamp", "forecast"]
    assert list(out.item_id.unique()) == ["a", "b", "c"]

    c_filled = c.copy()
    c_filled[80] = (c[79] + c[81]) / 2
    contexts = [a[-CONTEXT:], b[:-10][-CONTEXT:], c_filled[-CONTEXT:]]
    ends = [times[-1], times[-11], times[-1]]
    for name, want, end in zip("abc", library_forecast(model_dir, contexts), ends):
        rows = out[out.item_id == name]
        np.testing.assert_allclose(rows.forecast.to_numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        expected = pd.date_range(end, periods=HORIZON + 1, freq="h")[1:].strftime("%Y-%m-%d %H:%M:%S")
        assert list(rows.timestamp) == list(expected)


def test_long_csv_to_parquet(model_dir, tmp_path):
    x, y = walk(90, 4, 5.0), walk(30, 5, 0.5)  # y is shorter than the context: all of it is used
    frame = pd.concat([
        pd.DataFrame({"item_id": "x", "timestamp": pd.date_range("2023-03-01", periods=90, freq="D"), "value": x}),
        pd.DataFrame({"item_id": "y", "timestamp": pd.date_range("2023-05-01", periods=30, freq="D"), "value": y}),
    ]).sample(frac=1.0, random_state=0)  # rows in any order: the reader sorts them by time
    frame.to_csv(tmp_path / "long.csv", index=False)
    proc = run(model_dir, "--input", tmp_path / "long.csv", "--horizon", HORIZON, "--context-length", CONTEXT,
               "--out", tmp_path / "out.parquet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 series are shorter than --context-length 48" in proc.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    for name, want, start in zip("xy", library_forecast(model_dir, [x[-CONTEXT:], y]), ("2023-05-30", "2023-05-31")):
        rows = out[out.item_id == name]
        np.testing.assert_allclose(rows.forecast.to_numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert rows.timestamp.iloc[0] == pd.Timestamp(start)


def test_bad_input_is_one_line_and_leaves_nothing_behind(model_dir, tmp_path):
    pd.DataFrame({"date": pd.date_range("2024-01-01", periods=5, freq="D"), "sales": [1, 2, "n/a?", 4, 5]}).to_csv(
        tmp_path / "bad.csv", index=False)
    (tmp_path / "out.csv").write_text("an earlier run's forecasts\n")
    proc = run(model_dir, "--input", tmp_path / "bad.csv", "--horizon", 3, "--out", tmp_path / "out.csv",
               cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.csv" in lines[0] and "'sales'" in lines[0] and "n/a?" in lines[0], lines
    assert (tmp_path / "out.csv").read_text() == "an earlier run's forecasts\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.csv"]

    for args, words in [(("--input", tmp_path / "bad.csv", "--horizon", 0), "--horizon 0"),
                        (("--input", tmp_path / "none.csv", "--horizon", 3), "none.csv"),
                        (("--input", tmp_path / "bad.csv", "--horizon", 3, "--out", tmp_path / "o.txt"), "o.txt")]:
        proc = run(model_dir, *args, cwd=tmp_path)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
    pd.DataFrame({"date": pd.date_range("2024-01-01", periods=5, freq="D"), "sales": range(5)}).to_csv(
        tmp_path / "good.csv", index=False)
    proc = run(tmp_path / "no_model", "--input", tmp_path / "good.csv", "--horizon", 3, cwd=tmp_path)
    assert proc.returncode == 2 and "no_model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # --freq is checked before anything is read or loaded (here: before the missing model directory is found)
    proc = run(tmp_path / "no_model", "--input", tmp_path / "good.csv", "--horizon", 3, "--freq", "banana",
               cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "timemoe-forecast: error: --freq 'banana': not a pandas frequency alias (e.g. h, 15min, D, W-MON, MS, ME, "
        "QS, YS)"]


def test_freq_in_the_spelling_of_older_pandas(model_dir, tmp_path):
    pd.DataFrame({"date": pd.date_range("2024-01-01", periods=60, freq="D").strftime("%Y-%m-%d"),
                  "sales": walk(60, 6, 1.0)}).to_csv(tmp_path / "daily.csv", index=False)
    # the file's days, read as hours ("H", refused by pandas 3 as such): the forecast continues hour by hour
    proc = run(model_dir, "--input", tmp_path / "daily.csv", "--horizon", 3, "--freq", "H", "--context-length",
               CONTEXT, "--out", "out.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(pd.read_csv(tmp_path / "out.csv").timestamp) == [
        "2024-02-29 01:00:00", "2024-02-29 02:00:00", "2024-02-29 03:00:00"]
