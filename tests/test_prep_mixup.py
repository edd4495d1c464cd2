"""TSMixup: seeded convex combinations of z-scored segments of real series, one frequency at a time, never from the
tails held out for evaluation, never from a series the leakage guard left out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_prep import PrepOptions, prepare
from data_prep.leakage import LeakageGuard
from data_prep.sources import EmbeddedSource
from data_prep.sources.mixup import TSMixup
from test_prep_time300b import read_all


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def source_segment(mix: np.ndarray, pool: list[np.ndarray], atol: float = 1e-9) -> tuple[int, int] | None:
    """(series, start) of the pool segment whose z-score `mix` is, or None."""
    for s, values in enumerate(pool):
        windows_NL = np.lib.stride_tricks.sliding_window_view(values, len(mix))
        z_NL = (windows_NL - windows_NL.mean(1, keepdims=True)) / windows_NL.std(1, keepdims=True)
        hits = np.flatnonzero(np.abs(z_NL - mix).max(1) <= atol)
        if hits.size:
            return s, int(hits[0])
    return None


def test_same_seed_same_series_and_the_seed_matters():
    rng = np.random.default_rng(0)
    pool = [[rng.normal(size=3000) for _ in range(4)]]
    a, b = TSMixup(seed=3, length=256, tail_excluded=100), TSMixup(seed=3, length=256, tail_excluded=100,
                                                                   num_series=5)
    assert all(np.array_equal(a.series(i, pool), b.series(i, pool)) for i in range(5))
    assert not np.allclose(a.series(0, pool), TSMixup(seed=4, length=256, tail_excluded=100).series(0, pool))


def test_one_component_is_a_z_scored_segment_that_never_reaches_the_tail():
    rng = np.random.default_rng(1)
    lengths = (400, 700, 1000)
    pool = [rng.normal(size=n) for n in lengths]
    gen = TSMixup(seed=0, length=128, max_components=1, tail_excluded=200)
    used = set()
    for i in range(40):
        found = source_segment(gen.series(i, [pool]), pool)
        assert found is not None, f"mixup {i} is not a z-scored segment of a pool series"
        s, start = found
        assert start + 128 <= lengths[s] - 200  # the held-out tail is never drawn from
        used.add(s)
    assert used == {0, 1, 2}


def test_mixups_are_convex_combinations_within_one_frequency():
    """Hourly-like series cycle every 24 points, half-hourly-like every 48: no mixup carries both periods."""
    t = np.arange(4000)
    rng = np.random.default_rng(2)
    hourly = [np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6)) + 0.05 * rng.normal(size=t.size) for _ in range(3)]
    halfhourly = [np.sin(2 * np.pi * t / 48 + rng.uniform(0, 6)) + 0.05 * rng.normal(size=t.size) for _ in range(3)]
    gen = TSMixup(seed=0, length=960, max_components=3, tail_excluded=0)
    periods = []
    for i in range(30):
        power = np.abs(np.fft.rfft(gen.series(i, [hourly, halfhourly]))) ** 2
        p24, p48 = power[960 // 24], power[960 // 48]
        assert min(p24, p48) < 1e-3 * max(p24, p48)
        periods.append(24 if p24 > p48 else 48)
    assert set(periods) == {24, 48}


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="concentration"):
        TSMixup(concentration=0)
    with pytest.raises(ValueError, match="tail_excluded"):
        TSMixup(tail_excluded=-1)


def test_the_embedded_mixups_leave_out_what_the_guard_leaves_out(tmp_path):
    """A benchmark CSV holding a piece of one hourly series (Belgian prices): that series is excluded from its own
    dataset and from every mixup; the mixups come from the other five, and say so in the manifest."""
    keep = ("energy/epf_fr_be", "synthetic/tsmixup")
    mixup = TSMixup(seed=1, num_series=12, length=256, max_components=1)
    source = EmbeddedSource(datasets=keep, synthetic=None, mixup=mixup)
    spec = next(s for s in source.discover().datasets if s.kind == "table")
    real = source.series(spec)
    bench = tmp_path / "bench.csv"
    pd.DataFrame({"date": range(300), "price": real[0][1][5000:5300]}).to_csv(bench, index=False)
    manifest = prepare(source, tmp_path / "out", PrepOptions(workers=1, progress=False,
                                                             guard=LeakageGuard((str(bench),))))
    assert manifest["datasets"]["synthetic/tsmixup"]["sequences"] == 12
    assert manifest["source"]["mixup"]["num_series"] == 12
    assert manifest["excluded"] == [{"item_id": f"energy/epf_fr_be/{real[0][0]}",
                                     "reason": "shares a normalised 64-point window with bench.csv:price"}]
    pool = [values.astype(np.float32).astype(np.float64) for _, values in real]
    mixes = {k: v for k, v in read_all(tmp_path / "out").items() if k.startswith("synthetic/tsmixup/")}
    assert len(mixes) == 12
    for mix in mixes.values():
        found = source_segment(zscore(mix[2].astype(np.float64)), pool, atol=1e-4)
        assert found is not None and found[0] != 0
