"""A user's whole GIFT-Eval path, through the installed commands from outside the checkout: a pretraining corpus in
GIFT-Eval's layout (holding one of the benchmark's series) prepared with `--source hf-disk` and the GIFT-Eval
guard, a few steps of a tiny model, the export, then `timemoe-eval gift-eval`, whose config.json declares
`testdata_leakage` "No" because the corpus was guarded against that very data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gift_layout import save_config, walk

pytest.importorskip("timemoe_train.evaluate.gift_eval", reason="timemoe-eval gift-eval is not in this tree yet")
pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TRAIN = ["model=tiny", "data.max_length=32", "data.num_workers=0", "trainer.global_batch_size=8",
         "trainer.micro_batch_size=4", "logger=none", "logger.progress=false", "optim.warmup_steps=1",
         "trainer.max_steps=3", "checkpoint.interval=3"]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args[0]}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def test_prep_train_export_and_gift_eval(tmp_path):
    rng = np.random.default_rng(11)
    daily = [walk(rng, 400) for _ in range(3)]
    save_config(tmp_path / "gift", "solar/D", daily, "D")
    save_config(tmp_path / "gift", "m4_weekly", [walk(rng, n, level=500) for n in (60, 75, 90)], "W-SUN")
    # The pretraining corpus, in the same layout: unrelated series, and one benchmark series copied whole.
    save_config(tmp_path / "pretrain", "energy/grid/D", [walk(rng, 600) for _ in range(4)] + [daily[1]], "D")

    prep = run(tmp_path, "timemoe-prep", "--source", "hf-disk", "--input", "pretrain", "--output", "corpus",
               "--exclude-benchmark", "gift-eval:gift", "--workers", "1", "--no-progress")
    assert "leakage guard: cut GIFT-Eval test windows out of 1 series" in prep.stdout
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["excluded"][0]["cut"] == [[340, 400]]  # its 2 test windows of 30 points
    run(tmp_path, "timemoe-train", "data.path=corpus", "run.dir=run", *TRAIN)
    run(tmp_path, "timemoe-export", "run/checkpoints", "model")
    done = run(tmp_path, "timemoe-eval", "gift-eval", "model", "--data", "gift", "--out", "scores",
               "--context-length", "64", "--batch-size", "16", "--device", "cpu")
    config = json.loads((tmp_path / "scores" / "config.json").read_text())
    assert config["testdata_leakage"] == "No"
    said = done.stdout + done.stderr
    assert "testdata_leakage: No: corpus corpus holds no test window of the 2 scored configurations" in said
    assert done.stdout.strip().splitlines()[-1].startswith("GIFT-Eval over 2 configs: MASE ")
