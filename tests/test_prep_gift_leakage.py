"""GIFT-Eval's test windows, by content: `--exclude-benchmark gift-eval:DIR` cuts them out of corpus series (copied
whole, rescaled, embedded in other data, or with only their history), `timemoe-prep audit` counts them; the expected
windows come from the protocol's own test spans (data_prep.gift_eval), not from the guard's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gift_layout import save_config, walk
from test_prep_time300b import folder_bytes, read_all, write_bin_dataset

from data_prep import CleanOptions, PrepError, PrepOptions, load_manifest, prepare
from data_prep.audit import audit
from data_prep.gift_eval import find_configurations
from data_prep.gift_leakage import AUDIT_NAME, config_digests
from data_prep.leakage import LeakageGuard
from data_prep.sources import HfDiskSource, Time300BSource
from data_prep.span_match import EVIDENCE, STRIDE, SpanIndex

PREP = str(Path(sys.executable).parent / "timemoe-prep")
OPTIONS = PrepOptions(workers=1, progress=False, clean=CleanOptions(min_length=8), shard_bytes=8192)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """GIFT-Eval's layout: a daily configuration (4 windows of 30), an M4 one (1 window of 13, short series) and a
    multivariate one with a NaN in a test window and an all-NaN variate."""
    root = tmp_path_factory.mktemp("gift")
    rng = np.random.default_rng(7)
    solar = [walk(rng, 1200) for _ in range(3)]
    weekly = [walk(rng, n, level=1000) for n in (80, 95, 110, 120, 150)]
    ett = [np.stack([walk(rng, 800), walk(rng, 800, scale=0.1, level=3), np.full(800, np.nan, np.float32)])
           for _ in range(2)]
    ett[0][1, 750] = np.nan
    save_config(root, "solar/D", solar, "D")
    save_config(root, "m4_weekly", weekly, "W-SUN")
    save_config(root, "ett1/D", ett, "D", ids=["a", "b"])
    return root, {"solar/D": solar, "m4_weekly": weekly, "ett1/D": ett}


def expected_windows(root: Path) -> dict[str, dict[tuple, tuple[int, int]]]:
    """Configuration -> (term, series name, window) -> the window's [start, stop), from the protocol."""
    return {c.name: {(term, s.item_id, s.window): (s.start, s.stop) for term in c.terms for s in c.test_spans(term)}
            for c in find_configurations(root)}


def test_the_protocol_windows_of_the_fixture(bench):
    root, _ = bench
    windows = expected_windows(root)
    assert len(windows["solar/D"]) == 3 * 4 and windows["solar/D"][("short", "item_1", 3)] == (1170, 1200)
    assert windows["m4_weekly"][("short", "item_2", 0)] == (97, 110)
    assert len(windows["ett1/D"]) == 2 * 3 * 3 and windows["ett1/D"][("short", "a_dim1", 0)] == (710, 740)


@pytest.fixture(scope="module")
def corpus_input(bench, tmp_path_factory):
    """Training data holding: a GIFT series copied whole and continued; one variate's last 300 points z-normalised
    inside noise; a whole short M4 series; one series' history up to its first test window only; unrelated walks."""
    root, data = bench
    rng = np.random.default_rng(8)
    z = lambda x: (x - np.nanmean(x)) / np.nanstd(x)  # noqa: E731
    planted = {
        "continued": np.concatenate([data["solar/D"][1], walk(rng, 200, level=float(data["solar/D"][1][-1]))]),
        "normalised": np.concatenate([rng.normal(size=50), z(data["ett1/D"][0][1][-300:]), rng.normal(size=40)]),
        "m4": data["m4_weekly"][2].copy(),
        "history": data["solar/D"][0][:1080].copy(),
        "unrelated": walk(rng, 900),
    }
    folder = tmp_path_factory.mktemp("train")
    save_config(folder, "mixed", list(planted.values()), "D", ids=list(planted))
    return folder, planted


def test_planted_copies_are_found_with_their_exact_windows(bench, corpus_input):
    root, _ = bench
    _, planted = corpus_input
    guard = LeakageGuard(gift_eval=(str(root),))
    cuts = {name: guard.screen(name, values.astype(np.float64)) for name, values in planted.items()}
    assert cuts["continued"][0] == [(0, 1080), (1200, 1400)] and cuts["continued"][1]["cut"] == [[1080, 1200]]
    # z-normalised, with a NaN in its window 2 and shifted by 50: the last 90 of the 300 points, all three windows
    assert cuts["normalised"][0] == [(0, 260), (350, 390)]
    assert cuts["m4"][0] == [(0, 97)]  # only the 13 test points; its history stays
    assert "GIFT-Eval test windows (m4_weekly item_2)" in cuts["m4"][1]["reason"]
    for name in ("history", "unrelated"):  # history alone holds no test point
        assert cuts[name] == ([(0, len(planted[name]))], None)


def test_prep_cuts_them_and_the_audit_counts_them(bench, corpus_input, tmp_path):
    root, data = bench
    folder, planted = corpus_input
    open_corpus, guarded = tmp_path / "open", tmp_path / "guarded"
    prepare(HfDiskSource(str(folder)), open_corpus, OPTIONS)
    guard = LeakageGuard(gift_eval=(str(root),))
    manifest = prepare(HfDiskSource(str(folder)), guarded, PrepOptions(**{**OPTIONS.__dict__, "guard": guard}))
    assert [(e["item_id"], e["cut"]) for e in manifest["excluded"]] == [
        ("other/mixed/continued", [[1080, 1200]]), ("other/mixed/normalised", [[260, 350]]),
        ("other/mixed/m4", [[97, 110]])]
    got = read_all(guarded)
    # the pieces are named by their first point, as cleaning names the pieces of a split series
    assert sorted(got) == ["other/mixed/continued@0", "other/mixed/continued@1200", "other/mixed/history",
                           "other/mixed/m4@0", "other/mixed/normalised@0", "other/mixed/normalised@350",
                           "other/mixed/unrelated"]
    assert np.array_equal(got["other/mixed/continued@1200"][2], planted["continued"][1200:])
    assert np.array_equal(got["other/mixed/m4@0"][2], planted["m4"][:97])
    record = manifest["leakage_guard"]["gift_eval"][0]
    assert record["configs"]["solar/D"]["sha256"] == config_digests(root)["solar/D"]
    assert record["configs"]["m4_weekly"]["terms"] == {"short": {"prediction_length": 13, "windows": 1}}

    windows = expected_windows(root)
    held = audit(open_corpus, (str(root),), progress=False)
    # what the plants hold, window by window, from the protocol's spans
    expect = {"solar/D": {k for k in windows["solar/D"] if k[1] == "item_1"},
              "m4_weekly": {k for k in windows["m4_weekly"] if k[1] == "item_2"},
              "ett1/D": {k for k in windows["ett1/D"] if k[1] == "a_dim1"}}
    for name, c in held["configs"].items():
        assert c["terms"]["short"] == {"windows": len(windows[name]), "found": len(expect[name]), "series": 1}, name
    assert held["configs"]["solar/D"]["examples"] == ["other/mixed/continued"]
    assert held["totals"] == {"windows": 12 + 5 + 18, "found": 4 + 1 + 3}
    assert audit(guarded, (str(root),), progress=False)["totals"]["found"] == 0


def test_time300b_files_read_in_place_are_cut_by_their_index(bench, tmp_path):
    """A .bin dataset is never staged: its cut series becomes index entries pointing into the same stream (stored
    normalised with its mean/std, as Time-300B stores series, and straddling the two .bin files)."""
    root, data = bench
    rng = np.random.default_rng(10)
    continued = np.concatenate([data["solar/D"][1], walk(rng, 200, level=float(data["solar/D"][1][-1]))])
    sequences = [walk(rng, 500), continued, walk(rng, 300)]
    expected = write_bin_dataset(tmp_path / "in" / "energy" / "mine", sequences, split_at=1000, scaled={1},
                                 gap_before=2)
    manifest = prepare(Time300BSource(str(tmp_path / "in")), tmp_path / "out",
                       PrepOptions(**{**OPTIONS.__dict__, "guard": LeakageGuard(gift_eval=(str(root),))}))
    assert [(e["item_id"], e["cut"]) for e in manifest["excluded"]] == [("energy/mine/1", [[1080, 1200]])]
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["energy/mine/0", "energy/mine/1@0", "energy/mine/1@1200", "energy/mine/2"]
    assert np.array_equal(got["energy/mine/1@0"][2], expected[1][:1080])
    assert np.array_equal(got["energy/mine/1@1200"][2], expected[1][1200:])
    assert np.array_equal(got["energy/mine/2"][2], expected[2])


def test_every_term_is_counted_on_an_old_alias_configuration(tmp_path):
    """A sub-daily configuration written with pandas' old alias (10T) is scored at three terms (windows of 48, 480
    and 720 points); each window counts once any of its points is in the corpus."""
    rng = np.random.default_rng(12)
    series = walk(rng, 1600)
    save_config(tmp_path / "gift", "traffic/10T", [series, walk(rng, 1700)], "10T")
    copies = {"tail": (1100, 1600), "early": (900, 1000)}  # the last 500 points; 100 points inside the long window
    save_config(tmp_path / "in", "mixed", [series[a:b] for a, b in copies.values()] + [walk(rng, 800)], "10min",
                ids=[*copies, "unrelated"])
    prepare(HfDiskSource(str(tmp_path / "in")), tmp_path / "corpus", OPTIONS)
    [config] = find_configurations(tmp_path / "gift")
    assert config.terms == ("short", "medium", "long")
    expect = {term: {"windows": 0, "found": 0} for term in config.terms}
    for term in config.terms:
        for span in config.test_spans(term):
            expect[term]["windows"] += 1
            held = span.item_id == "item_0" and any(a < span.stop and span.start < b for a, b in copies.values())
            expect[term]["found"] += held
    assert expect == {"short": {"windows": 8, "found": 4}, "medium": {"windows": 2, "found": 1},
                      "long": {"windows": 2, "found": 1}}
    found = audit(tmp_path / "corpus", (str(tmp_path / "gift"),), progress=False)["configs"]["traffic/10T"]["terms"]
    assert {term: {k: t[k] for k in ("windows", "found")} for term, t in found.items()} == expect


def test_a_corpus_without_copies_is_left_whole(bench, tmp_path):
    root, _ = bench
    rng = np.random.default_rng(9)
    save_config(tmp_path / "in", "walks", [walk(rng, 700) for _ in range(6)], "D")
    manifest = prepare(HfDiskSource(str(tmp_path / "in")), tmp_path / "out",
                       PrepOptions(**{**OPTIONS.__dict__, "guard": LeakageGuard(gift_eval=(str(root),))}))
    assert manifest["excluded"] == [] and manifest["totals"]["sequences"] == 6
    assert audit(tmp_path / "out", (str(root),), progress=False)["totals"]["found"] == 0


def test_workers_1_and_2_give_identical_bytes_with_the_guard(bench, corpus_input, tmp_path):
    root, _ = bench
    folder, _ = corpus_input
    options = {**OPTIONS.__dict__, "guard": LeakageGuard(gift_eval=(str(root),))}
    prepare(HfDiskSource(str(folder)), tmp_path / "one", PrepOptions(**options))
    prepare(HfDiskSource(str(folder)), tmp_path / "two", PrepOptions(**{**options, "workers": 2}))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_the_commands_from_outside_the_checkout(bench, corpus_input, tmp_path):
    root, _ = bench
    folder, _ = corpus_input
    run = lambda *args: subprocess.run([PREP, *args], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    common = ["--source", "hf-disk", "--input", str(folder), "--workers", "1", "--no-progress", "--min-length", "8"]
    done = run(*common, "--output", "guarded", "--exclude-benchmark", f"gift-eval:{root}")
    assert done.returncode == 0, done.stderr
    assert "leakage guard: cut GIFT-Eval test windows out of 3 series" in done.stdout
    assert run(*common, "--output", "open").returncode == 0
    found = run("audit", "open", "--benchmark", f"gift-eval:{root}", "--no-progress", "--json", "audit.json",
                "--workers", "2")
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0].split() == ["configuration", "term", "windows", "found", "series"]
    assert lines[2].split() == ["ett1/D", "short", "18", "3", "1"]
    assert lines[-1] == (f"audit: 8 of 35 GIFT-Eval test windows found in open (written to "
                         f"open/{AUDIT_NAME})")
    kept = json.loads((tmp_path / "open" / AUDIT_NAME).read_text())
    digests = config_digests(root)
    assert kept["gift-eval"][digests["m4_weekly"]]["found"] == 1
    assert json.loads((tmp_path / "audit.json").read_text())["totals"] == {"windows": 35, "found": 8}
    bad = run(*common, "--output", "x", "--exclude-benchmark", f"gift-eval:{tmp_path / 'nowhere'}")
    assert bad.returncode == 2 and bad.stderr.startswith(f"timemoe-prep: error: {tmp_path / 'nowhere'}: "
                                                         "--exclude-benchmark = ")
    usage = run(*common, "--output", "x", "--exclude-benchmark", str(root))
    assert usage.returncode == 2 and "expected gift-eval:DIR" in usage.stderr
    assert run(*common, "--output", "x", "--no-leakage-guard", "--exclude-benchmark",
               f"gift-eval:{root}").returncode == 2


# The content matcher itself, on references of its own.

@pytest.fixture(scope="module")
def references():
    rng = np.random.default_rng(0)
    refs = [walk(rng, n) for n in (300, 60, 25, 500)]
    return refs, SpanIndex.build(refs)


def test_a_copy_of_evidence_points_is_found_at_every_phase(references):
    refs, index = references
    rng = np.random.default_rng(1)
    for phase in range(STRIDE):
        x = np.concatenate([3 * rng.normal(size=37 + phase), refs[0][100:100 + EVIDENCE], rng.normal(size=30)])
        [m] = index.matches(x)
        assert (m.ref, m.shift, m.start, m.stop) == (0, phase - 63, 37 + phase, 37 + phase + EVIDENCE)
    assert index.matches(refs[0][100:100 + EVIDENCE - 8]) == []  # shorter than the evidence asked for


def test_rescaled_revised_and_short_copies_are_found_unrelated_ones_are_not(references):
    refs, index = references
    rng = np.random.default_rng(2)
    z = ((refs[3] - refs[3].mean()) / refs[3].std()).astype(np.float32)  # as Time-300B stores its series
    assert [(m.ref, m.start, m.stop) for m in index.matches(z)] == [(3, 0, 500)]
    revised = refs[3].copy()
    revised[[40, 41, 200, 333]] += 5.0  # a few revised points: still a copy
    assert [(m.ref, m.start, m.stop) for m in index.matches(revised)] == [(3, 0, 500)]
    revised[250:270] = walk(rng, 20)  # a revised stretch: two copies, on either side of it
    assert [(m.ref, m.start, m.stop) for m in index.matches(revised)] == [(3, 0, 250), (3, 270, 500)]
    whole_short = np.concatenate([rng.normal(size=11), 2.5 * refs[2] - 7, rng.normal(size=20)])
    assert [(m.ref, m.start, m.stop) for m in index.matches(whole_short)] == [(2, 11, 36)]
    for _ in range(50):
        assert index.matches(walk(rng, 1000)) == []
    ramp = np.arange(500, dtype=np.float32)
    assert SpanIndex.build([ramp]).matches(ramp + 3) == []  # a straight line identifies nothing


def test_bad_gift_eval_data_is_one_line(tmp_path):
    with pytest.raises(PrepError, match="nowhere: --exclude-benchmark = 'gift-eval:.*: no such directory"):
        LeakageGuard(gift_eval=(str(tmp_path / "nowhere"),))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="holds no save_to_disk directory"):
        LeakageGuard(gift_eval=(str(tmp_path / "empty"),))
