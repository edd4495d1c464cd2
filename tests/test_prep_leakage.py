"""The leakage guard: a benchmark series copied into the training input is found and left out, and said so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import PrepOptions, load_manifest, prepare
from data_prep.leakage import LeakageGuard
from data_prep.sources import EmbeddedSource
from data_prep.sources.embedded import SHIPPED_ETTH1

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
    source = EmbeddedSource(datasets=keep, synthetic=None, guard=LeakageGuard((str(bench),)))
    manifest = prepare(source, tmp_path / "out", PrepOptions(workers=1, progress=False))
    expected = [{"item_id": f"energy/epf_fr_be/{item}",
                 "reason": "shares a normalised 64-point window with my_benchmark.csv:price"}]
    assert manifest["excluded"] == expected and manifest["datasets"]["energy/epf_fr_be"]["excluded"] == expected
    assert manifest["datasets"]["energy/epf_fr_be"]["sequences"] == len(EmbeddedSource().series(spec)) - 1
    assert load_manifest(tmp_path / "out")["source"]["leakage_guard"]["benchmarks"][0]["file"] == "my_benchmark.csv"


def test_the_demo_guards_against_the_shipped_etth1():
    assert SHIPPED_ETTH1 == ETTH1 and EmbeddedSource().guard.benchmarks == (str(ETTH1),)
