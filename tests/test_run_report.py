"""What a run says, through the real `timemoe-train` with its output going to a file (not a terminal): the start
summary (corpus, windows per epoch, epochs, parameters, layout, weights; a warning for a corpus smaller than one
step), plain progress lines instead of a bar, the end summary with the export command, "already at step N" for a
finished run, the restart mark in metrics.jsonl and the layout change of an elastic resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.train.report import layout_change, parameter_counts

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
OVERRIDES = ["model=tiny", "data.max_length=32", "data.num_workers=0", "trainer.global_batch_size=8",
             "trainer.micro_batch_size=4", "logger=none", "logger.progress_interval=2", "checkpoint.interval=2",
             "optim.warmup_steps=2"]
PROGRESS = re.compile(r"step (\d+)/(\d+)  loss \d+\.\d{4}  [\d,]+ points/s  elapsed \S+  ETA \S+")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One 200-point series: 6 windows of 33 points and a packed tail, fewer than one step's 8."""
    folder = tmp_path_factory.mktemp("corpus")
    t = np.arange(200)
    values = np.sin(2 * np.pi * t / 24) + np.random.default_rng(0).normal(0, 0.1, t.size)
    pd.DataFrame({"date": pd.date_range("2020-01-01", periods=t.size, freq="h").astype(str), "load": values}
                 ).to_csv(folder / "small.csv", index=False)
    proc = subprocess.run([str(BIN / "timemoe-prep"), "--source", "csv", "--input", str(folder / "small.csv"),
                           "--output", str(folder / "prepared"), "--domain", "energy", "--workers", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return folder / "prepared"


def train(corpus: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "timemoe-train"), f"data.path={corpus}", *OVERRIDES, f"run.dir={run_dir}",
                           *overrides], capture_output=True, text=True, timeout=900, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def said(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[len("timemoe-train: "):] for line in proc.stdout.splitlines() if line.startswith("timemoe-train: ")]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_parameter_counts_match_the_model():
    c = TimeMoeConfig.preset("tiny")
    model = TimeMoeForPrediction(c)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    rest = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    assert experts > 0
    assert parameter_counts(model, c, ep_size=1) == (rest + experts,
                                                     rest + experts * c.num_experts_per_tok // c.num_experts)


def test_layout_change_names_what_changed():
    now = {"world_size": 1, "ep_size": 1, "zero_stage": 1, "precision": "fp32"}
    assert layout_change(dict(now), now) is None
    assert layout_change({**now, "world_size": 2, "ep_size": 2}, now) == \
        "layout 2 processes EP=2 → 1 process EP=1 (elastic resume)"
    assert layout_change({**now, "world_size": 2, "zero_stage": 0}, now) == \
        "layout 2 processes EP=1 zero_stage=0 → 1 process EP=1 zero_stage=1 (elastic resume)"


def test_a_run_in_a_log_file_says_what_it_will_do_and_did(corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = train(corpus, run_dir, "trainer.max_steps=4")
    lines = said(first)
    assert lines[0] == f"starting a new run in {run_dir}"
    assert f"corpus {corpus}: 1 sequences, 200 points, 1 domain (energy)" in lines
    [epochs] = [line for line in lines if "windows per epoch" in line]
    per_epoch = int(epochs.split()[0])
    assert per_epoch < 8
    assert epochs == (f"{per_epoch} windows per epoch (data.max_length=32); this run: steps 1-4 of "
                      f"trainer.max_steps=4, 32 windows = {32 / per_epoch:.2f} epochs")
    c = TimeMoeConfig.preset("tiny")
    total, active = parameter_counts(TimeMoeForPrediction(c), c, 1)
    assert f"model: {total:,} parameters, {active:,} activated per point (2 layers, hidden 32, 4 experts, top-2, " \
           "native MoE)" in lines
    assert ("layout: 1 process (data-parallel 1, expert-parallel 1), ZeRO-0, fp32 on cpu; 8 windows per step = "
            "4 per micro-batch x 2 accumulation x 1 data-parallel; up to 256 points per step") in lines
    assert "weights: random (trainer.seed=0)" in lines
    assert any(line.startswith(f"warning: the corpus fills {per_epoch} windows, fewer than one step's 8") for line in lines)

    # No bar: one plain line at the first step (the first estimate of the time left) and every
    # logger.progress_interval steps; the log holds what the terminal showed.
    assert "\r" not in first.stdout + first.stderr
    progress = [PROGRESS.fullmatch(line) for line in first.stdout.splitlines() if line.startswith("step ")]
    assert [m and m.groups() for m in progress] == [("1", "4"), ("2", "4"), ("4", "4")]
    log = [line.split(" - ", 1)[1] for line in (run_dir / "timemoe-train.log").read_text().splitlines()
           if line.startswith("[") and "[timemoe_train.train]" in line]
    shown = [line for line in first.stdout.splitlines() if line.startswith(("timemoe-train: ", "step ", "checkpoint "))]
    assert log == shown and len(shown) >= 12, (log, shown)

    final = records(run_dir)[-1]
    tag = run_dir / "checkpoints" / "step00000004"
    end = lines[-3:]
    assert re.fullmatch(rf"finished at step 4: 4 steps in \d+s, final loss {final['loss']:.4f}", end[0]), end
    assert end[1:] == [f"checkpoint {tag}", f"export: timemoe-export {tag} {run_dir / 'export'}"]

    again = train(corpus, run_dir, "trainer.max_steps=4")
    assert said(again) == [f"already at step 4 of trainer.max_steps=4 ({tag}): nothing to train; raise "
                           f"trainer.max_steps to continue, or export it: timemoe-export {tag} {run_dir / 'export'}"]
    assert "DeepSpeed" not in again.stdout + again.stderr  # ended before the engine was even imported
    assert len(records(run_dir)) == 4

    more = train(corpus, run_dir, "trainer.max_steps=6")
    assert f"weights: resumed from step 4 ({tag})" in said(more)
    marks = [(r["step"], r.get("restarted_from_step")) for r in records(run_dir)]
    assert marks == [(1, None), (2, None), (3, None), (4, None), (5, 4), (6, None)]

    # The exported weights start a new run, which says so.
    export = tmp_path / "exported"
    exported = subprocess.run([str(BIN / "timemoe-export"), str(run_dir / "checkpoints"), str(export)],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith(f"exported step 6 ({run_dir / 'checkpoints' / 'step00000006'}) to {export}")
    started = train(corpus, tmp_path / "from-export", "trainer.max_steps=1", f"trainer.init_from_hf={export}")
    assert f"weights: initialised from {export}" in said(started)


def test_a_step_with_non_finite_data_names_the_shard_and_row(corpus, tmp_path):
    """400 bytes of the shard's values overwritten (NaN bit patterns): the skipped step says where they lie, and the
    run saves its only (skipped) step."""
    import shutil

    import pyarrow as pa

    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged, ignore=shutil.ignore_patterns("plans"))
    [shard] = damaged.glob("shard-*.arrow")
    values = pa.ipc.open_file(pa.memory_map(str(shard))).get_batch(0).column("target").values.to_numpy()
    data = bytearray(shard.read_bytes())
    at = data.find(values[:8].tobytes()) + 4 * 100  # from the 100th point of the series on
    data[at:at + 400] = b"\xff" * 400
    shard.write_bytes(bytes(data))

    run_dir = tmp_path / "run"
    proc = train(damaged, run_dir, "trainer.max_steps=1")
    skipped = [line for line in proc.stderr.splitlines() if "skipped: non-finite data" in line]
    assert skipped, proc.stderr[-3000:]
    spans = []
    for line in skipped:
        m = re.fullmatch(rf"timemoe-train: rank 0: step 1 skipped: non-finite data in micro-batch \d row \d, point "
                         rf"\d+: {re.escape(str(shard))} row 0 \(item energy/small/load\), points (\d+)-(\d+)", line)
        assert m, line
        spans.append((int(m[1]), int(m[2])))
    assert all(a <= 199 and b >= 100 for a, b in spans)  # each named span holds damaged points
    assert records(run_dir)[-1]["skipped"] is True
    # Saved although Adam never stepped and so has no state yet.
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000001"
