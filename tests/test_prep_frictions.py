"""What a first-time user of timemoe-prep runs into: a corrected re-run after a failure, long tables without
--value-columns or --id-columns, inspecting a corpus one cannot write to."""

from __future__ import annotations

import subprocess
import sys

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
    assert failed.returncode == 1 and "--id-columns station" in failed.stderr
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
