"""What `make demo` prints at the end: each margin over each baseline as it is, however thin, and, when it scored
a sample of the test windows, the command that scores all of them."""

from pathlib import Path

from timemoe_train.demo import verdict


def results(windows: int) -> dict:
    metrics = {"demo model": {"mse": 0.440, "mae": 0.4330, "mase": 1.1},
               "seasonal_naive": {"mse": 0.504, "mae": 0.4310, "mase": 1.1},
               "last_value": {"mse": 1.294, "mae": 0.7133, "mase": 1.7}}
    return {"rows": [{"horizon": 96, "windows_per_channel": 2785, "windows_evaluated_per_channel": windows,
                      "metrics": metrics}]}


def test_the_verdict_gives_every_margin_and_how_to_score_every_window():
    lines = verdict(results(500), Path("/runs/demo/hf"))
    assert lines[0] == "ETTh1, horizon 96, context 512, 500 of 2,785 test windows per channel (7 channels):"
    assert lines[1] == ("  MSE: demo model 0.440 vs seasonal naive 0.504 (beats it by 12.7%); vs last value 1.294 "
                        "(beats it by 66.0%)")
    assert lines[2] == ("  MAE: demo model 0.433 vs seasonal naive 0.431 (does NOT beat it: 0.5% behind); vs last "
                        "value 0.713 (beats it by 39.3%)")
    assert "timemoe-eval /runs/demo/hf --csv " in lines[3] and lines[3].endswith(
        "ETTh1.csv --horizons 96 --context-lengths 512")
    assert len(verdict(results(2785), Path("/runs/demo/hf"))) == 3  # every window scored: nothing to add
