"""timemoe-eval's leakage line: for every (model, CSV) pair, whether the CSV was kept out of the model's training
corpus, read from the model's training_data.json (as timemoe-export writes it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from test_eval import ETTH1, tiny_model_dir

from data_prep.leakage import LeakageGuard
from timemoe_train.evaluate import evaluate_long_horizon
from timemoe_train.evaluate.cli import main as eval_main
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction


def with_record(model_dir: Path, benchmarks: list[Path]) -> Path:
    """The record of a corpus whose guard hashed `benchmarks` (and applied the ETT name rule)."""
    guard = LeakageGuard(tuple(map(str, benchmarks))).describe()
    record = {"corpus": "/corpora/mine", "manifest_sha256": "0" * 64, "leakage_guard": {**guard, "excluded": 0}}
    (model_dir / "training_data.json").write_text(json.dumps(record))
    return model_dir


def test_guarded_by_name_only_not_guarded_and_unknown(tmp_path, capsys):
    toy = tmp_path / "toy.csv"
    t = np.arange(600)
    pd.DataFrame({"date": pd.date_range("2021-01-01", periods=600, freq="h").astype(str),
                  "OT": np.sin(2 * np.pi * t / 24) + 0.1 * np.cos(t / 7.0)}).to_csv(toy, index=False)
    ett = tmp_path / "ETTh1.csv"  # an ETTh1 whose bytes no guard hashed
    ett.write_bytes(ETTH1.read_bytes() + b"\n")
    guarded = with_record(tiny_model_dir(tmp_path / "guarded", 0), [toy])
    plain = with_record(tiny_model_dir(tmp_path / "plain", 0), [])
    released = tiny_model_dir(tmp_path / "released", 0)
    out = tmp_path / "out"
    assert eval_main([str(guarded), str(plain), str(released), "--csv", str(toy), str(ett), "--columns", "OT",
                      "--horizons", "8", "--context-lengths", "48", "--max-windows", "2", "--out", str(out),
                      "--no-progress"]) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    status = {(d["dataset"], label): s["status"] for d in results["datasets"] for label, s in d["leakage"].items()}
    assert status == {("toy", "guarded"): "guarded", ("toy", "plain"): "not guarded", ("toy", "released"): "unknown",
                      ("ETTh1", "guarded"): "by name only", ("ETTh1", "plain"): "by name only",
                      ("ETTh1", "released"): "unknown"}
    sha = hashlib.sha256(toy.read_bytes()).hexdigest()
    assert f"- `guarded` on toy: guarded: its content (toy.csv, sha256 {sha[:12]}) was excluded" in captured.out
    assert "## Leakage" in (out / "results.md").read_text()
    warnings = [line for line in captured.err.splitlines() if "WARNING" in line]
    assert len(warnings) == 3  # plain on toy, both recorded models on the ETTh1 copy; never `unknown`
    assert "`plain` on toy is not guarded" in captured.err and f"--benchmarks {toy}" in captured.err
    assert f"--benchmarks {ett}" in captured.err


def test_a_model_object_or_an_unreadable_record_is_unknown(tmp_path):
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny"))
    options = dict(horizons=[8], context_lengths=[48], columns=["OT"], max_windows=1, progress=False)
    results = evaluate_long_horizon(model, ETTH1, **options)
    assert results["leakage"]["model"]["status"] == "unknown"
    broken = tiny_model_dir(tmp_path / "broken", 0)
    (broken / "training_data.json").write_text("{not json")
    results = evaluate_long_horizon(broken, ETTH1, **options)
    assert results["leakage"]["model"] == {"status": "unknown",
                                           "detail": f"{broken / 'training_data.json'}: unreadable "
                                                     "(Expecting property name enclosed in double quotes: line 1 "
                                                     "column 2 (char 1))"}


def test_a_corpus_prepared_with_the_guard_off_is_not_guarded(tmp_path):
    from data_prep.leakage import NO_GUARD

    off = tiny_model_dir(tmp_path / "off", 0)
    record = {"corpus": "/corpora/ett", "manifest_sha256": "0" * 64, "leakage_guard": {**NO_GUARD.describe(),
                                                                                         "excluded": 0}}
    (off / "training_data.json").write_text(json.dumps(record))
    results = evaluate_long_horizon(off, ETTH1, horizons=[8], context_lengths=[48], columns=["OT"], max_windows=1,
                                    progress=False)
    assert results["leakage"]["model"] == {"status": "not guarded",
                                           "detail": "corpus /corpora/ett was prepared with the leakage guard off"}


def test_each_csv_is_hashed_once_however_many_models(tmp_path, monkeypatch):
    from timemoe_train.evaluate import leakage

    hashed = []
    real = leakage.file_digest
    monkeypatch.setattr(leakage, "file_digest", lambda path: hashed.append(Path(path)) or real(path))
    models = [(f"m{i}", with_record(tiny_model_dir(tmp_path / f"m{i}", i), [ETTH1])) for i in range(3)]
    report = leakage.leakage_report(models + [("released", tiny_model_dir(tmp_path / "released", 0))], ETTH1)
    assert [s["status"] for s in report.values()] == ["guarded"] * 3 + ["unknown"]
    assert hashed == [ETTH1]
    assert leakage.leakage_report([("released", tmp_path / "released")], ETTH1)["released"]["status"] == "unknown"
    assert hashed == [ETTH1]  # no record asked for it


def test_a_model_trained_on_synthetic_series_only_saw_no_benchmark(tmp_path):
    """The record timemoe-export writes for a `data=synthetic` run, read by both protocols: nothing real was seen."""
    import yaml

    from timemoe_train.evaluate.leakage import gift_eval_leakage
    from timemoe_train.export.training_data import write_training_data

    run, model = tmp_path / "run", tiny_model_dir(tmp_path / "model", 0)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": {"_target_": "timemoe_train.train.synthetic.SyntheticDataConfig", "seed": 3, "max_length": 512}}))
    write_training_data(run, model)
    results = evaluate_long_horizon(model, ETTH1, horizons=[8], context_lengths=[48], columns=["OT"], max_windows=1,
                                    progress=False)
    note = "trained on seeded synthetic series only (data=synthetic, seed 3)"
    assert results["leakage"]["model"] == {"status": "synthetic only",
                                           "detail": f"{model / 'training_data.json'}: {note}"}
    from gift_layout import save_config, walk

    save_config(tmp_path / "suite", "shop/D", [walk(np.random.default_rng(0), 400)], "D")
    decided = gift_eval_leakage(model, tmp_path / "suite")
    assert decided == {"testdata_leakage": "No", "configs": {"shop/D": "synthetic"},
                       "line": f"testdata_leakage: No: {note}"}
