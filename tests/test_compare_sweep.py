"""`experiment=moe_vs_dense` end to end through the real commands: `timemoe-prep` packs a small corpus, one
`timemoe-train` sweep trains 2 arms × 2 seeds for a few steps, and `python -m timemoe_train.compare` on
the sweep directory writes the report; its held-out figures are recomputed here from the CSV and the exported
models, independently of compare's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import cycles_corpus, worker_env  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS, HOLDOUT, CONTEXT = 4, 48, 64
# The preset with the steps and windows of a test; its mixture names the embedded corpus's domains, this one has one.
SMALL = [f"trainer.max_steps={STEPS}", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
         "data.max_length=64", "data.normalization_excludes=8", "data.mixture_weights=null", "optim.warmup_steps=1",
         "logger.progress=false"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(cwd, sweep dir, compare's process, the series): one sweep of the preset and its report."""
    cwd = tmp_path_factory.mktemp("study")
    series = cycles_corpus(cwd, points=1_500, channels=4)
    train = subprocess.run([str(BIN / "timemoe-train"), "experiment=moe_vs_dense", "data.path=prepared",
                            "hydra.sweep.dir=sweep", "trainer.seed=0,1", *SMALL], cwd=cwd, env=worker_env(),
                           capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-6000:]
    # What else a sweep directory may hold: a run of another experiment, and a job of this one that never finished.
    other = cwd / "sweep" / "another-run" / ".hydra"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("trainer: {seed: 0}\ndata: {path: prepared, holdout_points: 0}\n")
    unfinished = cwd / "sweep" / "unfinished" / ".hydra"
    unfinished.mkdir(parents=True)
    finished = next((cwd / "sweep").glob("*/.hydra/config.yaml"))
    (unfinished / "config.yaml").write_text(finished.read_text().replace("seed: 0", "seed: 7"))
    compare = subprocess.run([sys.executable, "-m", "timemoe_train.compare", str(cwd / "sweep"),
                              "--csv", str(REPO / "examples" / "data" / "ETTh1.csv"), "--max-windows", "2",
                              "--context", str(CONTEXT), "--no-progress"], cwd=tmp_path_factory.mktemp("elsewhere"),
                             env=worker_env(), capture_output=True, text=True, timeout=900)
    return cwd, cwd / "sweep", compare, series


def test_the_report_of_a_real_sweep(study):
    cwd, sweep, compare, series = study
    assert compare.returncode == 0, compare.stderr[-6000:]
    assert "another-run: skipped, not a job of experiment=moe_vs_dense" in compare.stderr
    assert "unfinished: skipped, no finished checkpoint" in compare.stderr
    report = json.loads((sweep / "report" / "report.json").read_text())
    arms = report["arms"]
    assert list(arms) == ["dense", "moe"] or list(arms) == ["moe", "dense"]
    assert arms["moe"]["seeds"] == arms["dense"]["seeds"] == [0, 1]
    # Equal activated weights per point, printed; the MoE holds more in all.
    assert arms["moe"]["activated_params"] == arms["dense"]["activated_params"]
    assert arms["moe"]["total_params"] > arms["dense"]["total_params"]
    for arm in ("moe", "dense"):
        assert f"{arm}: {arms[arm]['activated_params']:,} activated weights per point" in compare.stdout
    md = (sweep / "report" / "report.md").read_text()
    assert "| moe | 0,1 |" in md and "| dense | 0,1 |" in md and "| moe − dense |" in md
    assert "ETTh1 h96 MSE" in md and "Left out:" in md and "- moe seed 0: layer0 " in md
    assert (sweep / "report" / "report.png").stat().st_size > 10_000
    for job in report["jobs"]:
        assert len(job["loss_curve"]) == STEPS
        metrics = [json.loads(line) for line in (Path(job["dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert job["train_loss"] == pytest.approx(np.median([np.mean([v for k, v in m.items()
                                                                      if k.startswith("head_loss/")]) for m in metrics]))
        assert bool(job["expert_load"]) == (job["arm"] == "moe")


def test_held_out_figures_recomputed_from_the_csv(study):
    """The last HOLDOUT points of every series, forecast by each exported model from the CONTEXT points before them,
    in units of each window's std (one domain: no mean over domains)."""
    from timemoe_train.model import TimeMoeForPrediction

    cwd, sweep, compare, series = study
    assert compare.returncode == 0, compare.stderr[-6000:]
    report = json.loads((sweep / "report" / "report.json").read_text())
    windows = np.stack([v[-(CONTEXT + HOLDOUT):] for v in series.values()]).astype(np.float32).astype(np.float64)
    z = (windows - windows.mean(1, keepdims=True)) / windows.std(1, keepdims=True)
    context, truth = torch.tensor(z[:, :CONTEXT], dtype=torch.float32), z[:, CONTEXT:]
    last = np.repeat(z[:, CONTEXT - 1:CONTEXT], HOLDOUT, axis=1)
    baseline = report["jobs"][0]["held_out_last_value"]
    assert baseline["mse"] == pytest.approx(np.mean((last - truth) ** 2), rel=1e-6)
    assert baseline["mae"] == pytest.approx(np.mean(np.abs(last - truth)), rel=1e-6)
    for job in report["jobs"]:
        assert job["held_out"]["series"] == len(series)
        model = TimeMoeForPrediction.from_pretrained(Path(job["dir"]) / "hf").eval()
        with torch.no_grad():
            forecast = model.forecast(context, HOLDOUT).double().numpy()
        assert job["held_out"]["mse"] == pytest.approx(np.mean((forecast - truth) ** 2), rel=1e-5)
        assert job["held_out"]["mae"] == pytest.approx(np.mean(np.abs(forecast - truth)), rel=1e-5)
