"""What a first-time user of timemoe-prep runs into: a corrected re-run after a failure, long tables without
--value-columns or --id-columns, inspecting a corpus one cannot write to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep import PrepError, PrepOptions, prepare
from data_prep.sources import TableLayout, TableSource
from test_prep_time300b import REPO, read_all

OPTIONS = PrepOptions(workers=1, progress=False)
HOURS = pd.date_range("2024-01-01", periods=40, freq="h").astype(str)


def long_csv(path, id_name="id", value_name="load"):
    rows = [(s, t, float(i) + 10 * k) for k, s in enumerate("ab") for i, t in enumerate(HOURS)]
    pd.DataFrame(rows, columns=[id_name, "timestamp", value_name]).to_csv(path, index=False)
    return path


def prep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.cli", *args, "--workers", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_long_table_with_one_candidate_value_column_needs_no_value_columns(tmp_path):
    prepare(TableSource("csv", str(long_csv(tmp_path / "t.csv"))), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["other/t/a", "other/t/b"]
    assert np.array_equal(got["other/t/b"][2], np.arange(40) + 10.0)


def test_long_table_without_id_columns_gets_a_hint(tmp_path):
    path = long_csv(tmp_path / "t.csv", id_name="station")
    with pytest.raises(PrepError, match="not a number; if it names the series .* pass --id-columns station"):
        prepare(TableSource("csv", str(path)), tmp_path / "out", OPTIONS)
    prepare(TableSource("csv", str(path), layout=TableLayout(id_columns=("station",))), tmp_path / "out", OPTIONS)
    assert sorted(read_all(tmp_path / "out")) == ["other/t/a", "other/t/b"]


def test_a_failed_job_that_wrote_nothing_does_not_block_the_corrected_rerun(tmp_path):
    path = long_csv(tmp_path / "t.csv", id_name="station")
    out = tmp_path / "out"
    failed = prep("--source", "csv", "--input", str(path), "--output", str(out))
    assert failed.returncode == 2 and "--id-columns station" in failed.stderr
    fixed = prep("--source", "csv", "--input", str(path), "--output", str(out), "--id-columns", "station")
    assert fixed.returncode == 0, fixed.stderr
    assert sorted(read_all(out)) == ["other/t/a", "other/t/b"]


def test_inspect_writes_outside_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    prepare(TableSource("csv", str(long_csv(tmp_path / "t.csv"))), corpus, OPTIONS)
    before = sorted(p.name for p in corpus.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    default = subprocess.run([sys.executable, "-m", "data_prep.cli", "inspect", str(corpus)], cwd=work,
                             capture_output=True, text=True, timeout=300)
    assert default.returncode == 0, default.stderr
    assert (work / "corpus-samples.png").stat().st_size > 0
    out = tmp_path / "plots" / "mine.png"
    out.parent.mkdir()
    chosen = subprocess.run([sys.executable, "-m", "data_prep.cli", "inspect", str(corpus), "--out", str(out)],
                            cwd=work, capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0 and out.stat().st_size > 0, chosen.stderr
    assert sorted(p.name for p in corpus.iterdir()) == before  # nothing written into the corpus folder


def wide_csv(path, a, b):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"timestamp": HOURS[:len(a)], "a": a, "b": b}).to_csv(path, index=False)
    return path


NAN40 = [np.nan] * 40
SOURCES_WITHOUT_A_SEQUENCE = {
    "header only": (lambda p: (p.write_text("timestamp,a,b\n"), p)[1], "rows = 0: the table has no rows"),
    "all NaN": (lambda p: wide_csv(p, NAN40, NAN40), "sequences = 0: all 2 series are NaN/inf throughout"),
    "all too short": (lambda p: wide_csv(p, range(5), range(5, 10)),
                      "sequences = 0: cleaning left none of its 2 series: 2 shorter than --min-length 16 points"),
    "all constant": (lambda p: wide_csv(p, [1.0] * 40, [2.0] * 40),
                     "sequences = 0: cleaning left none of its 2 series: 2 constant (--keep-constant keeps them)"),
    "all excluded by the leakage guard": (
        lambda p: pd.read_csv(REPO / "examples" / "data" / "ETTh1.csv").iloc[:300, :3].to_csv(p, index=False) or p,
        "sequences = 0: the leakage guard excluded all 2 series (--no-leakage-guard keeps them)"),
}


@pytest.mark.parametrize("case", SOURCES_WITHOUT_A_SEQUENCE, ids=list(SOURCES_WITHOUT_A_SEQUENCE))
def test_a_source_that_yields_no_sequence_fails_naming_the_file_and_why(case, tmp_path):
    make, why = SOURCES_WITHOUT_A_SEQUENCE[case]
    path = make(tmp_path / "mine.csv")
    result = prep("--source", "csv", "--input", str(path), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.splitlines()
    assert line == f"timemoe-prep: error: {path}: {why}"
    assert not (tmp_path / "out").exists()  # cleaning's verdict comes after the shards: they went too


def test_an_emptied_dataset_is_skipped_on_request_and_an_all_skipped_corpus_still_fails(tmp_path):
    good = wide_csv(tmp_path / "in" / "good.csv", np.arange(40.0), np.sin(np.arange(40.0)))
    wide_csv(tmp_path / "in" / "nan.csv", NAN40, NAN40)
    manifest = prepare(TableSource("csv", str(tmp_path / "in")), tmp_path / "out",
                       PrepOptions(workers=1, progress=False, on_error="skip"))
    assert list(manifest["datasets"]) == ["other/good"] and manifest["totals"]["sequences"] == 2
    [skipped] = manifest["skipped"]
    assert skipped["file"].endswith("nan.csv") and "NaN/inf throughout" in skipped["problem"]
    good.unlink()
    result = prep("--source", "csv", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"),
                  "--on-error", "skip")
    assert result.returncode == 2 and "no dataset yielded a sequence: " in result.stderr, result.stderr
    assert not (tmp_path / "out2").exists()


def test_inspect_of_an_empty_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    prepare(TableSource("csv", str(long_csv(tmp_path / "t.csv"))), corpus, OPTIONS)
    manifest = json.loads((corpus / "manifest.json").read_text())  # as an older timemoe-prep could write it
    manifest["totals"].update(sequences=0, points=0)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "data_prep.cli", "inspect", str(corpus)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"timemoe-prep: error: {corpus / 'manifest.json'}: totals.sequences = 0: "
                                          "the corpus holds no sequence: nothing to inspect (prepare it again: "
                                          "timemoe-prep now refuses input that yields none)"]


def installed_prep(cwd, *args: str) -> subprocess.CompletedProcess:
    """The console script, run from a folder outside the checkout, as a user runs it."""
    command = str(Path(sys.executable).with_name("timemoe-prep"))
    return subprocess.run([command, *args, "--workers", "1", "--no-progress"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def test_bad_input_is_one_line_exit_2_and_leaves_nothing_new_behind(tmp_path):
    good = wide_csv(tmp_path / "good.csv", np.arange(40.0), np.sin(np.arange(40.0)))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "mine").mkdir()  # a folder the user made: it stays, empty
    corpus = tmp_path / "corpus"
    assert installed_prep(tmp_path, "--source", "csv", "--input", "good.csv", "--output", "corpus").returncode == 0
    before = folder_state(tmp_path)
    cases = [
        (["--input", "missing.csv", "--output", "new/deeper"], "missing.csv: --input = 'missing.csv': no such file"),
        (["--input", "empty.csv", "--output", "mine"], "empty.csv: file = '': empty file"),
        (["--input", "good.csv", "--output", "new", "--freq", "banana"], "--freq 'banana': not a pandas frequency"),
        # a bad replacement leaves the corpus it was to replace as it was
        (["--input", "empty.csv", "--output", "corpus", "--overwrite"], "empty.csv: file = '': empty file"),
    ]
    for args, message in cases:
        result = installed_prep(tmp_path, "--source", "csv", *args)
        assert result.returncode == 2, (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("timemoe-prep: error: ") and message in line, line
        assert folder_state(tmp_path) == before, args
    assert good.is_file() and (corpus / "manifest.json").is_file()


@pytest.mark.parametrize("given, kept", [("h", "h"), ("H", "h"), ("15T", "15min"), ("M", "ME"), ("MS", "MS")])
def test_freq_is_read_in_old_and_new_pandas_spellings(tmp_path, given, kept):
    wide_csv(tmp_path / "t.csv", np.arange(40.0), np.sin(np.arange(40.0)))
    result = installed_prep(tmp_path, "--source", "csv", "--input", "t.csv", "--output", "out", "--freq", given)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["datasets"]["other/t"]["freq"] == kept
