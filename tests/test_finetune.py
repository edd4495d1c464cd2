"""timemoe-finetune: the split keeps the test part away from training and validation, the report is timemoe-eval's
own scoring, the output is the released layout, bad input is one line with nothing written; and the trainer's
validation, best checkpoint and early stopping (trainer.val_interval / patience) behind it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_eval_leakage import with_record
from test_remote_code import assert_forecasts_match, load_remote, random_walks

from data_prep.leakage import NO_GUARD
from timemoe_train.data import DataConfig, build_train_loader
from timemoe_train.data.corpus import read_manifest
from timemoe_train.data.shards import ShardStore
from timemoe_train.finetune.cli import model_overrides
from timemoe_train.finetune.split import parse_split, read_input, split_series
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.model.hf_layout import save_hf

ENV = {**os.environ, "DS_BUILD_OPS": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
MARKER = 7777.0  # planted in every test row; no training or validation value comes near it
ROWS, SPLIT = 600, "0.6,0.2,0.2"  # train [0, 360), val [360, 480), test [480, 600)
CONTEXT, HORIZON = 32, 16  # windows of 48 + 1 points


def bin_(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([bin_("timemoe-finetune"), *map(str, args)], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def tiny_base(directory: Path) -> Path:
    torch.manual_seed(0)
    config = TimeMoeConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_experts=2, horizon_lengths=[1, 8])
    model = TimeMoeForPrediction(config)
    with torch.no_grad():  # O(1) forecasts, so that the roll-out feeds back values that matter
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
    return save_hf(model, directory)


# Empty cells: inside the train part, inside the test part (truth the report leaves out) and inside the last
# CONTEXT rows (a context timemoe-forecast fills); none in the val part, which a test compares value by value.
GAPS = {"a": [100, 101, 500], "b": [250, 590]}


def marked_csv(path: Path) -> Path:
    t = np.arange(ROWS)
    rng = np.random.default_rng(0)
    values = {"a": np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(ROWS),
              "b": 3 + np.cos(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(ROWS)}
    for name, v in values.items():
        v[480:] += MARKER
        v[GAPS[name]] = np.nan
    pd.DataFrame({"date": pd.date_range("2021-01-01", periods=ROWS, freq="h").astype(str), **values}).to_csv(
        path, index=False)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    csv = marked_csv(root / "marked.csv")
    base = with_record(tiny_base(root / "base"), [csv])  # a base whose corpus kept this file out
    out = root / "out"
    args = [base, "--data", csv, "--out", out, "--split", SPLIT, "--nproc", 1, "--horizons", HORIZON,
            "--context-length", CONTEXT, "--max-windows", 8, "trainer.max_steps=6", "trainer.val_interval=2",
            "trainer.val_batches=2", "optim.warmup_steps=2", "optim.lr=1e-3", "logger.progress=false"]
    result = run(*args, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "csv": csv, "base": base, "out": out, "stdout": result.stdout, "args": args,
            "report": json.loads((out / "finetune_report.json").read_text())}


def corpus_values(path: Path) -> list[np.ndarray]:
    store = ShardStore.scan(read_manifest(path))
    return [np.asarray(store.sequence(s)) for s in range(len(store))]


@pytest.mark.slow
def test_marker_in_the_test_part_never_reaches_a_training_or_validation_batch(finetuned):
    data = finetuned["out"] / "finetune" / "data"
    for part in ("train", "val"):
        assert max(v.max() for v in corpus_values(data / part)) < 100, part
        # The batches themselves, as the trainer builds them (values as stored, so the marker would show).
        cfg = DataConfig(path=str(data / part), max_length=CONTEXT + HORIZON, window_mode="random",
                         normalization="none", num_workers=0)
        batches = iter(build_train_loader(cfg, 0, 1, 8, 8))
        for _ in range(20):
            batch = next(batches)
            assert batch["inputs"].max() < 100 and batch["labels"].max() < 100
        batches.close()


@pytest.mark.slow
def test_validation_is_exactly_the_val_rows_of_each_series(finetuned):
    frame = pd.read_csv(finetuned["csv"])
    val = sorted(corpus_values(finetuned["out"] / "finetune" / "data" / "val"), key=lambda v: v[0])
    expected = sorted((frame[c].to_numpy()[360:480] for c in ("a", "b")), key=lambda v: v[0])
    assert len(val) == 2
    for got, want in zip(val, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 shards
    record = json.loads((finetuned["out"] / "training_data.json").read_text())["split"]
    assert record["series"][0]["train"] == [0, 360] and record["series"][0]["val"] == [360, 480]
    assert record["series"][0]["test"] == [480, 600]


@pytest.mark.slow
def test_report_numbers_equal_timemoe_eval_on_the_output_which_reports_it_held_out(finetuned, tmp_path):
    report = finetuned["report"]
    command = shlex.split(report["eval_command"])
    result = subprocess.run([bin_(command[0]), *command[1:], "--out", str(tmp_path), "--no-progress"], env=ENV,
                            cwd=finetuned["root"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    evaluated = json.loads((tmp_path / "results.json").read_text())["datasets"][0]
    assert evaluated["leakage"]["model"]["status"] == "held out", evaluated["leakage"]
    ours = report["datasets"][0]
    assert ours["leakage"]["fine-tuned"]["status"] == "held out"
    for row, theirs in zip(ours["rows"], evaluated["rows"]):
        assert row["metrics"]["fine-tuned"] == theirs["metrics"]["model"]
        assert row["metrics"]["seasonal_naive"] == theirs["metrics"]["seasonal_naive"]
    # The fine-tuned model is not the base: the comparison above is not between two copies of one model.
    assert ours["rows"][0]["metrics"]["fine-tuned"] != ours["rows"][0]["metrics"]["zero-shot"]
    assert report["training"]["best_checkpoint"] is not None and report["training"]["validations"]


@pytest.mark.slow
def test_fine_tuning_then_forecasting_a_csv_with_gaps(finetuned, tmp_path):
    """The gaps: filled by prep's cleaning for training, left out of the report's truth, filled in the context of
    timemoe-forecast run on the fine-tuned export."""
    [row] = finetuned["report"]["datasets"][0]["rows"]
    assert row["gaps"]["truth_points_missing"] == 2 and np.isfinite(row["metrics"]["fine-tuned"]["mae"])
    result = subprocess.run([bin_("timemoe-forecast"), str(finetuned["out"]), "--input", str(finetuned["csv"]),
                             "--horizon", str(HORIZON), "--context-length", str(CONTEXT), "--out", "forecast.csv",
                             "--no-progress"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "1 missing points inside the contexts filled linearly" in result.stderr  # b's row 590
    forecast = pd.read_csv(tmp_path / "forecast.csv")
    assert list(forecast.item_id.unique()) == ["a", "b"] and len(forecast) == 2 * HORIZON
    assert forecast.forecast.notna().all() and (forecast.forecast.abs() > 1000).all()  # at the marked level


@pytest.mark.slow
def test_the_printed_training_command_is_shell_quoted(finetuned):
    [line] = [line for line in finetuned["stdout"].splitlines() if line.startswith("$ ")]
    argv = shlex.split(line[2:])
    assert argv[1:4] == ["-m", "timemoe_train.launch", "--nproc-per-node=1"]
    assert "++model.horizon_lengths=[1, 8]" in argv and f"run.dir={finetuned['out'] / 'finetune'}" in argv


@pytest.mark.slow
def test_the_same_command_again_writes_the_report_alone(finetuned):
    out = finetuned["out"]
    checkpoints = sorted(p.name for p in (out / "finetune" / "checkpoints").iterdir())
    weights = (out / "model.safetensors").read_bytes()
    (out / "finetune_report.md").unlink()
    result = run(*finetuned["args"], cwd=finetuned["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"timemoe-finetune: {out} already holds the model this command fine-tuned" in result.stdout
    assert not any(line.startswith("$ ") for line in result.stdout.splitlines())  # no trainer launched
    assert (out / "finetune_report.md").is_file()
    assert sorted(p.name for p in (out / "finetune" / "checkpoints").iterdir()) == checkpoints
    assert (out / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "finetune_report.json").read_text())["datasets"] == finetuned["report"]["datasets"]


@pytest.mark.slow
def test_output_loads_in_the_self_contained_remote_code(finetuned):
    out = finetuned["out"]
    theirs = load_remote(out)
    ours = TimeMoeForPrediction.from_pretrained(out).eval()
    with torch.no_grad():
        assert_forecasts_match(ours, theirs, random_walks(2, 64), horizons=(16,))


@pytest.mark.slow
def test_trainer_keeps_the_best_checkpoint_and_stops_early(finetuned, tmp_path):
    """Generic trainer keys on the corpora the fixture prepared: at lr 1e-30 nothing improves after the first
    validation, so with patience 2 the run stops at step 6 and step 2 (the best) survives keep_last=1."""
    data = finetuned["out"] / "finetune" / "data"
    result = subprocess.run(
        [bin_("timemoe-train"), "experiment=finetune", *model_overrides(finetuned["base"]),
         f"data.path={data / 'train'}",         f"trainer.val_path={data / 'val'}", f"data.max_length={CONTEXT + HORIZON}", f"run.dir={tmp_path}",
         "trainer.max_steps=20", "trainer.val_interval=2", "trainer.val_batches=2", "trainer.patience=2",
         "optim.lr=1e-30", "optim.min_lr=0", "logger.progress=false", "logger.wandb.mode=disabled"],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4, 6]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "best").read_text() == "step00000002"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000002", "step00000006"]


def test_jsonl_in_the_released_format_is_read_and_split(tmp_path):
    path = tmp_path / "finetune.jsonl"
    sequences = [list(np.arange(n, dtype=float)) for n in (100, 150)]
    path.write_text("".join(json.dumps({"sequence": s}) + "\n" for s in sequences) + "\n")
    data = read_input(path)
    assert data.kind == "jsonl" and [len(v) for _, v in data.series] == [100, 150]
    np.testing.assert_array_equal(data.series[1][1], sequences[1])
    splits = split_series(data, parse_split("0.7,0.1,0.2"), window_points=20, longest_horizon=10)
    assert [s.borders.test for s in splits] == [(80, 100), (120, 150)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["short series", "splits do not sum to 1", "not a Time-MoE",
                                  "the report's context shorter than a season"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case):
    base = tiny_base(tmp_path / "base")
    csv = marked_csv(tmp_path / "marked.csv")
    args = {"short series": [base, "--data", csv, "--context-length", 512],
            "splits do not sum to 1": [base, "--data", csv, "--split", "0.7,0.2,0.2"],
            "not a Time-MoE": [tmp_path, "--data", csv],
            # found before training, not after it (the fine-tuned weights would be there, and no report)
            "the report's context shorter than a season": [base, "--data", csv, "--context-length", 16]}[case]
    out = tmp_path / "out"
    result = run(*args, "--out", out, "--horizons", HORIZON, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timemoe-finetune: "), lines
    expected = {"short series": "shorter than one window", "splits do not sum to 1": "summing to 1",
                "not a Time-MoE": "not a Time-MoE",
                "the report's context shorter than a season": "the before/after report cannot score this data: "
                "--context-lengths [16]: each must cover one season (24 rows)"}[case]
    assert expected in lines[0]
    assert not out.exists()


def test_validation_batches_are_the_validation_corpus_first_windows(tmp_path):
    """The validator reads the corpus it is given as stride windows, whatever the training data group samples."""
    from data_prep import PrepOptions, prepare
    from timemoe_train.finetune.split import PartSource
    from timemoe_train.train.config import TrainerConfig
    from timemoe_train.train.validation import Validator

    arrays = tmp_path / "val.npz"
    np.savez(arrays, names=np.array(["x"]), s0=np.arange(200, dtype=float))
    prepare(PartSource(str(arrays), "toy-val", None), tmp_path / "val",
            PrepOptions(workers=1, guard=NO_GUARD, progress=False))
    train_data = DataConfig(path="/elsewhere", max_length=49, window_mode="random", normalization="none",
                            num_workers=2)
    trainer = TrainerConfig(val_path=str(tmp_path / "val"), val_interval=1, val_batches=2, micro_batch_size=2)
    validator = Validator(train_data, trainer, 0, 1)
    starts = [float(row[0]) for batch in validator.batches for row in batch["inputs"]]
    # stride = max_length (consecutive windows share one point), the 4-point tail a row of its own
    assert len(set(starts)) == 4 and set(starts) <= {0.0, 49.0, 98.0, 147.0, 196.0}
    again = Validator(train_data, trainer, 0, 1).batches  # the same windows every time
    assert all(torch.equal(a[k], b[k]) for a, b in zip(validator.batches, again) for k in a)
