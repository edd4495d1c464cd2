"""GIFT-Eval's protocol (data_prep/gift_eval.py) and the evaluator's windows against the reference GIFT-Eval itself
uses: gluonts' `split(offset=-pl·w)` + `generate_instances(pl, w, distance=pl)` over entries made by gluonts'
ProcessDataEntry, a multivariate target split per variate as `<item_id>_dim<v>` (GIFT-Eval's `Dataset.test_data`,
rebuilt here from gluonts' own pieces; gift_eval itself is not on PyPI). Prediction lengths and window counts are
the protocol's facts, written out per fixture."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from data_prep.errors import PrepError
from data_prep.gift_eval import base_unit, find_configurations, period_freq
from data_prep.gift_suite import save_configuration

gluonts_split = pytest.importorskip("gluonts.dataset.split")
from gluonts.dataset.common import ProcessDataEntry  # noqa: E402
from gluonts.time_feature import norm_freq_str  # noqa: E402
from gluonts.transform.feature import LastValueImputation  # noqa: E402

from timemoe_train.evaluate.gift_eval.windows import windows_of  # noqa: E402

RNG = np.random.default_rng(7)


def walk(n: int) -> np.ndarray:
    return (50 + RNG.standard_normal(n).cumsum()).astype(np.float32)


def with_nan(values: np.ndarray, *slices) -> np.ndarray:
    values = values.copy()
    for s in slices:
        values[s] = np.nan
    return values


# name -> (rows, {term: (prediction length, windows), or None where the shortest series has no history before the
# windows}, leaderboard key of the short term)
FIXTURES = {
    # M4: its own prediction lengths, one window whatever the lengths; weekly anchored on Sunday
    "m4_weekly": ([{"item_id": f"W{i}", "start": "2001-01-07", "freq": "W-SUN", "target": walk(60 + 37 * i)}
                   for i in range(3)], {"short": (13, 1)}, "m4_weekly/W/short"),
    # GIFT-Eval's own name with the old 10-minute alias: its official medium and long terms; NaN inside
    "solar/10T": ([{"item_id": "s0", "start": "2020-01-01 00:00", "freq": "10T",
                    "target": with_nan(walk(2000), slice(5, 40), slice(1500, 1510))},
                   {"item_id": "s1", "start": "2020-01-03 00:10", "freq": "10T", "target": walk(2400)}],
                  {"short": (48, 5), "medium": (480, 1), "long": (720, 1)}, "solar/10T/short"),
    # not GIFT-Eval's, the new alias, below a day: short, medium and long; leading NaN
    "mine/10min": ([{"item_id": "a", "start": "2021-05-01 00:00", "freq": "10min",
                     "target": with_nan(walk(1900), slice(0, 30))}],
                   {"short": (48, 4), "medium": (480, 1), "long": (720, 1)}, "mine/10min/short"),
    # multivariate, one variate all NaN, another NaN across a window's border; GIFT-Eval's name: properties' 7
    "ett1/H": ([{"item_id": "ett", "start": "2016-07-01 00:00", "freq": "H",
                 "target": np.stack([walk(1200), np.full(1200, np.nan, np.float32),
                                     with_nan(walk(1200), slice(1130, 1160))])}],
               {"short": (48, 3), "medium": (480, 1), "long": (720, 1)}, "ett1/H/short"),
    # the new hourly alias: medium and long too, but 600 points leave no history before a long window
    "hourly/h": ([{"item_id": "h", "start": "2022-01-01 00:00", "freq": "h", "target": walk(600)}],
                 {"short": (48, 2), "medium": (480, 1), "long": None}, "hourly/h/short"),
    # 10 seconds, GIFT-Eval's own name without a frequency part: the key takes its properties' frequency
    "bizitobs_service": ([{"item_id": "svc", "start": "2023-01-01 00:00:00", "freq": "10S",
                           "target": walk(1300)}], {"short": (60, 3), "medium": (600, 1), "long": (900, 1)},
                         "bizitobs_service/10S/short"),
    # weekly anchored on Saturday (GIFT-Eval has W-WED), daily-or-longer: short only; a series shorter than any
    # context the model reads
    "weekly/W": ([{"item_id": "x", "start": "1990-01-06", "freq": "W-SAT", "target": walk(400)},
                  {"item_id": "y", "start": "1995-01-07", "freq": "W-SAT", "target": walk(45)}],
                 {"short": (8, 1)}, "weekly/W/short"),
    # month start: not a pandas Period frequency; the windows keep their periods in months
    "monthly/MS": ([{"item_id": "m", "start": "2000-01-01", "freq": "MS", "target": walk(250)}],
                   {"short": (12, 3)}, "monthly/MS/short"),
}


@pytest.fixture(scope="module")
def gift_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gift")
    for name, (rows, _, _) in FIXTURES.items():
        save_configuration(root / name, [{**r, "start": pd.Timestamp(r["start"])} for r in rows])
    return root


def reference_test_data(path, prediction_length: int, windows: int, freq: str):
    """GIFT-Eval's Dataset.test_data, from gluonts' pieces."""
    import datasets

    hf = datasets.load_from_disk(str(path)).with_format("numpy")
    one_dim = hf[0]["target"].ndim == 1
    process = ProcessDataEntry(freq, one_dim_target=one_dim)
    entries = []
    for row in hf:
        entry = process({**row, "start": row["start"].item()})
        if one_dim:
            entries.append(entry)
        else:
            entries += [{**entry, "target": v, "item_id": f"{entry['item_id']}_dim{i}"}
                        for i, v in enumerate(entry["target"])]
    _, template = gluonts_split.split(entries, offset=-prediction_length * windows)
    return template.generate_instances(prediction_length=prediction_length, windows=windows,
                                       distance=prediction_length)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_windows_equal_gluonts_split_as_gift_eval_uses_it(gift_dir, name):
    rows, terms, short_key = FIXTURES[name]
    config = {c.name: c for c in find_configurations(gift_dir)}[name]
    assert config.terms == tuple(terms)
    assert config.dataset_key("short") == short_key
    for term, expected in terms.items():
        assert config.fits(term) == (expected is not None)
        if expected is None:
            continue
        pl, w = expected
        assert (config.prediction_length(term), config.windows(term)) == (pl, w), term
        ours = windows_of(config, term)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref = list(reference_test_data(config.path, pl, w, period_freq(config.freq)))
        assert len(ours) == len(ref) == sum(len(np.atleast_2d(r["target"])) for r in rows) * w
        for i, (inp, label) in enumerate(ref):
            assert ours.input[i]["item_id"] == inp["item_id"] == label["item_id"]
            np.testing.assert_array_equal(ours.input[i]["target"], inp["target"])
            np.testing.assert_array_equal(ours.label[i]["target"], label["target"])
            assert ours.input[i]["start"] == inp["start"] and ours.label[i]["start"] == label["start"]
            assert len(label["target"]) == pl
            # what the forecasters see: gluonts' LastValueImputation of exactly this input
            np.testing.assert_array_equal(ours.histories[i], LastValueImputation()(inp["target"].copy()))
            assert np.isfinite(ours.histories[i]).all()
        spans = list(config.test_spans(term))
        assert [(s.item_id, s.stop - s.start) for s in spans] == [(x["item_id"], pl) for _, x in ref]


def test_test_spans_are_the_last_non_overlapping_windows(gift_dir):
    config = {c.name: c for c in find_configurations(gift_dir)}["solar/10T"]
    spans = list(config.test_spans("short"))
    by_series = {}
    for s in spans:
        by_series.setdefault(s.item_id, []).append(s)
    for item, length in zip(("s0", "s1"), (2000, 2400)):
        ss = by_series[item]
        assert [s.window for s in ss] == list(range(5))
        assert ss[-1].stop == length and all(a.stop == b.start for a, b in zip(ss, ss[1:]))


def test_multivariate_and_all_nan_variate(gift_dir):
    config = {c.name: c for c in find_configurations(gift_dir)}["ett1/H"]
    assert config.multivariate and config.variates == 3 and config.num_variates == 7  # the property, a fact
    assert config.domain == "Energy"
    windows = windows_of(config, "short")
    dim1 = [i for i, label in enumerate(windows.label) if label["item_id"] == "ett_dim1"]
    assert len(dim1) == 3 and all(np.isnan(windows.label[i]["target"]).all() for i in dim1)
    assert all((windows.histories[i] == 0).all() for i in dim1)  # gluonts' fill for nothing present
    assert min(len(h) for h in windows.histories) == 1200 - 3 * 48


def test_series_shorter_than_any_context_keeps_its_whole_history(gift_dir):
    config = {c.name: c for c in find_configurations(gift_dir)}["weekly/W"]
    windows = windows_of(config, "short")
    assert [len(c) for c in windows.contexts(4096)] == [400 - 8, 45 - 8]
    assert [len(c) for c in windows.contexts(16)] == [16, 16]


# alias -> the unit GIFT-Eval's tables are keyed by (its data.py: gluonts' norm_freq_str of the offset's name,
# then the new names back to the old)
UNITS = {"H": "H", "h": "H", "10T": "T", "10min": "T", "5T": "T", "15min": "T", "W-SAT": "W", "W-WED": "W",
         "W": "W", "10S": "S", "10s": "S", "D": "D", "M": "M", "ME": "M", "MS": "M", "Q": "Q", "QE": "Q",
         "QS-OCT": "Q", "A-DEC": "A", "A": "A", "Y": "A", "YE": "A", "YS": "A"}
NEW_TO_OLD = {"Y": "A", "YE": "A", "QE": "Q", "ME": "M", "h": "H", "min": "T", "s": "S", "us": "U"}


@pytest.mark.parametrize("alias", list(UNITS))
def test_frequency_units_old_and_new_aliases(alias):
    assert base_unit(alias) == UNITS[alias]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        via_gluonts = norm_freq_str(pd.tseries.frequencies.to_offset(alias).name)
    assert NEW_TO_OLD.get(via_gluonts, via_gluonts) == UNITS[alias]


def test_prediction_length_and_windows_rules(tmp_path):
    save_configuration(tmp_path / "m4_hourly", [{"item_id": "a", "start": pd.Timestamp("2000-01-01"), "freq": "H",
                                                 "target": walk(5000)}])
    save_configuration(tmp_path / "long/D", [{"item_id": "a", "start": pd.Timestamp("2000-01-01"), "freq": "D",
                                              "target": walk(10_000)}])
    configs = {c.name: c for c in find_configurations(tmp_path)}
    m4, daily = configs["m4_hourly"], configs["long/D"]
    assert (m4.prediction_length("short"), m4.windows("short")) == (48, 1)
    assert daily.prediction_length("short") == 30
    assert daily.windows("short") == min(math.ceil(0.1 * 10_000 / 30), 20) == 20
    assert daily.terms == ("short",) and m4.terms == ("short",)


def test_bad_layouts_are_one_line_naming_file_and_field(tmp_path):
    with pytest.raises(PrepError, match="no such folder"):
        find_configurations(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="holds no save_to_disk directory"):
        find_configurations(tmp_path / "empty")
    save_configuration(tmp_path / "biz/B", [{"item_id": "a", "start": pd.Timestamp("2000-01-03"), "freq": "B",
                                             "target": walk(300)}])
    (config,) = find_configurations(tmp_path / "biz")
    with pytest.raises(PrepError) as e:
        config.prediction_length("short")
    assert "biz/B: freq = 'B'" in str(e.value) and "no prediction length" in str(e.value)
    assert "\n" not in str(e.value)
