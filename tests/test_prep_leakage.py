"""The leakage guard: a benchmark series copied into the training input is found and left out, and said so."""

from __future__ import annotations

from pathlib import Path

import hashlib

import numpy as np
import pandas as pd
import pytest

from data_prep import PrepError, PrepOptions, load_manifest, prepare
from data_prep.cli import main as prep_main
from data_prep.leakage import SHIPPED_ETTH1, LeakageGuard, default_guard
from data_prep.sources import EmbeddedSource, Time300BSource
from test_prep_time300b import read_all

ETTH1 = Path(__file__).resolve().parents[1] / "examples" / "data" / "ETTh1.csv"


@pytest.fixture(scope="module")
def etth1():
    return pd.read_csv(ETTH1)


def test_copies_of_a_benchmark_channel_are_caught_wherever_they_start_and_however_scaled(etth1):
    guard = LeakageGuard((str(ETTH1),))
    ot = etth1["OT"].to_numpy()
    rng = np.random.default_rng(0)
    for start in (0, 1, 777, 12_345):
        for scale, shift in ((1, 0), (1.8, 32), (0.001, 5)):  # units and offsets (a sign flip is another series)
            planted = np.concatenate([rng.normal(size=37), scale * ot[start:start + 200] + shift, rng.normal(size=50)])
            assert "ETTh1.csv:OT" in guard.check("energy/mine/series", planted)
    assert "ETTh1.csv:HUFL" in guard.check("x/y/z", etth1["HUFL"].to_numpy(np.float32))  # float32 round trip


def test_unrelated_series_pass(etth1):
    guard = LeakageGuard((str(ETTH1),))
    rng = np.random.default_rng(1)
    assert guard.check("a/b/noise", rng.normal(size=5000)) is None
    assert guard.check("a/b/flat", np.zeros(500)) is None  # flat stretches say nothing about origin
    # Every other hour of OT is a different series (and so is the whole embedded corpus: see test_prep_sources).
    ot = etth1["OT"].to_numpy()
    assert guard.check("a/b/other", ot[:3000:2]) is None


def test_ett_family_is_excluded_by_name():
    guard = LeakageGuard()
    assert guard.check("energy/ETTm2/OT", np.arange(10.0)) is not None
    assert guard.check("energy/settlements/OT", np.arange(10.0)) is None


def test_prep_leaves_a_planted_copy_out_and_the_manifest_lists_it(tmp_path):
    """The benchmark here is a CSV holding a piece of one real embedded series (Belgian day-ahead prices), so the
    embedded source itself carries the copy: that series is left out and listed, its neighbours go through."""
    keep = ("energy/epf_fr_be",)
    spec = EmbeddedSource(datasets=keep, synthetic=None).discover().datasets[0]
    # BE/y; BE/gen_forecast would also catch FR/gen_forecast: the package ships those values twice.
    item, values = EmbeddedSource().series(spec)[0]
    bench = tmp_path / "my_benchmark.csv"
    pd.DataFrame({"date": range(300), "price": values[5000:5300] * 1.1}).to_csv(bench, index=False)
    source = EmbeddedSource(datasets=keep, synthetic=None)
    manifest = prepare(source, tmp_path / "out", PrepOptions(workers=1, progress=False,
                                                             guard=LeakageGuard((str(bench),))))
    expected = [{"item_id": f"energy/epf_fr_be/{item}",
                 "reason": "shares a normalised 64-point window with my_benchmark.csv:price"}]
    assert manifest["excluded"] == expected and manifest["datasets"]["energy/epf_fr_be"]["excluded"] == expected
    assert manifest["datasets"]["energy/epf_fr_be"]["sequences"] == len(EmbeddedSource().series(spec)) - 1
    assert load_manifest(tmp_path / "out")["leakage_guard"]["benchmarks"][0]["file"] == "my_benchmark.csv"


def test_every_source_guards_against_the_shipped_etth1_by_default():
    assert SHIPPED_ETTH1 == ETTH1 and PrepOptions().guard.benchmarks == (str(ETTH1),)
    assert default_guard((str(ETTH1.parent / ".." / "data" / "ETTh1.csv"),)).benchmarks == (str(ETTH1),)  # once


def benchmark_and_planted(tmp_path, rng):
    """An evaluation CSV, and a series holding 300 of its points rescaled and shifted, inside 900."""
    bench = tmp_path / "my_eval.csv"
    walk = np.cumsum(rng.normal(size=400))
    pd.DataFrame({"date": range(400), "load": walk}).to_csv(bench, index=False)
    planted = np.concatenate([rng.normal(size=300), 2.5 * walk[20:320] - 7, rng.normal(size=300)])
    return bench, planted


def test_csv_prep_with_benchmarks_leaves_out_a_planted_copy_and_lists_it(tmp_path):
    rng = np.random.default_rng(2)
    bench, planted = benchmark_and_planted(tmp_path, rng)
    table = tmp_path / "train.csv"
    pd.DataFrame({"timestamp": range(900), "planted": planted,
                  "unrelated": np.cumsum(rng.normal(size=900))}).to_csv(table, index=False)
    out = tmp_path / "out"
    assert prep_main(["--source", "csv", "--input", str(table), "--output", str(out), "--workers", "1",
                      "--no-progress", "--benchmarks", str(bench)]) == 0
    manifest = load_manifest(out)
    assert manifest["excluded"] == [{"item_id": "other/train/planted",
                                     "reason": "shares a normalised 64-point window with my_eval.csv:load"}]
    assert manifest["datasets"]["other/train"]["sequences"] == 1  # the unrelated series stays
    records = {b["file"]: b for b in manifest["leakage_guard"]["benchmarks"]}
    assert set(records) == {"ETTh1.csv", "my_eval.csv"}  # added to the default
    assert records["my_eval.csv"]["sha256"] == hashlib.sha256(bench.read_bytes()).hexdigest()
    assert records["my_eval.csv"]["channels"] == ["date", "load"]


def test_other_benchmarks_do_not_reuse_a_finished_corpus(tmp_path, capsys):
    rng = np.random.default_rng(3)
    bench, _ = benchmark_and_planted(tmp_path, rng)
    table = tmp_path / "train.csv"
    pd.DataFrame({"timestamp": range(900), "x": np.cumsum(rng.normal(size=900))}).to_csv(table, index=False)
    args = ["--source", "csv", "--input", str(table), "--output", str(tmp_path / "out"), "--workers", "1",
            "--no-progress"]
    assert prep_main(args) == 0
    assert prep_main([*args, "--benchmarks", str(bench)]) == 2
    assert "holds a corpus made from another source or options" in capsys.readouterr().err


def test_a_missing_benchmark_is_a_clear_error(tmp_path, capsys):
    table = tmp_path / "train.csv"
    pd.DataFrame({"timestamp": range(300), "x": np.arange(300.0)}).to_csv(table, index=False)
    missing = tmp_path / "no_such_eval.csv"
    assert prep_main(["--source", "csv", "--input", str(table), "--output", str(tmp_path / "out"),
                      "--benchmarks", str(missing)]) == 2
    err = capsys.readouterr().err
    # the value is shortened in the middle when long (as tmp paths are): the line starts with the whole path
    assert err.startswith(f"timemoe-prep: error: {missing}: --benchmarks = ") and "no such file" in err, err
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PrepError, match="empty.csv: --benchmarks = .*not a readable CSV"):
        LeakageGuard((str(tmp_path / "empty.csv"),))


def test_time300b_files_indexed_in_place_are_guarded_too(tmp_path):
    """.npy rows are never staged: the guard reads them through memory maps and rewrites the index without them."""
    rng = np.random.default_rng(4)
    bench, planted = benchmark_and_planted(tmp_path, rng)
    (tmp_path / "in" / "energy").mkdir(parents=True)
    rows = np.stack([np.cumsum(rng.normal(size=900)), planted, np.cumsum(rng.normal(size=900))]).astype(np.float32)
    np.save(tmp_path / "in" / "energy" / "mine.npy", rows)
    manifest = prepare(Time300BSource(str(tmp_path / "in")), tmp_path / "out",
                       PrepOptions(workers=1, progress=False, guard=LeakageGuard((str(bench),))))
    assert [e["item_id"] for e in manifest["excluded"]] == ["energy/mine/mine/1"]
    assert manifest["datasets"]["energy/mine"]["sequences"] == 2
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["energy/mine/mine/0", "energy/mine/mine/2"]  # the kept rows keep their names
    assert np.array_equal(got["energy/mine/mine/2"][2], rows[2])


def test_no_leakage_guard_keeps_an_ett_named_series_and_says_so(tmp_path, capsys):
    """Fine-tuning on a benchmark's own training split: the user turns the guard off, the manifest records it."""
    table = tmp_path / "ETTh1_train.csv"
    etth1 = pd.read_csv(ETTH1)
    etth1.iloc[:2000].rename(columns={"date": "timestamp"}).to_csv(table, index=False)
    args = ["--source", "csv", "--input", str(table), "--workers", "1", "--no-progress"]
    assert prep_main([*args, "--output", str(tmp_path / "guarded")]) == 2  # every series excluded by name
    assert "the leakage guard excluded all 7" in capsys.readouterr().err
    assert prep_main([*args, "--output", str(tmp_path / "open"), "--no-leakage-guard"]) == 0
    manifest = load_manifest(tmp_path / "open")
    assert manifest["excluded"] == [] and manifest["datasets"]["other/ETTh1_train"]["sequences"] == 7
    assert manifest["leakage_guard"]["rule"].startswith("off") and manifest["leakage_guard"]["benchmarks"] == []
    with pytest.raises(SystemExit):
        prep_main([*args, "--output", str(tmp_path / "x"), "--no-leakage-guard", "--benchmarks", str(ETTH1)])
    assert "contradict" in capsys.readouterr().err
