"""Bad input: each case names the file and the offending value; --on-error skip leaves the dataset out and lists it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import PrepError, PrepOptions, load_manifest, prepare
from data_prep.sources import TableLayout, TableSource, Time300BSource
from test_prep_time300b import REPO, read_all, write_bin_dataset

OPTIONS = PrepOptions(workers=1, progress=False)


def good_corpus(root: Path) -> Path:
    rng = np.random.default_rng(3)
    write_bin_dataset(root / "energy" / "good", [rng.normal(size=40).astype(np.float32) for _ in range(3)],
                      split_at=50)
    write_bin_dataset(root / "web" / "bad", [rng.normal(size=40).astype(np.float32) for _ in range(3)], split_at=70)
    return root / "web" / "bad"


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def truncate_bin(folder: Path) -> None:
    path = folder / "data-1-of-2.bin"
    path.write_bytes(path.read_bytes()[:-8])


def replace_files(folder: Path, name: str, content: bytes) -> None:
    for p in folder.iterdir():
        p.unlink()
    (folder / name).write_bytes(content)


def jsonl(folder: Path, text: str) -> None:
    replace_files(folder, "part.jsonl", text.encode())


CASES = {
    "truncated bin": (truncate_bin, "data-1-of-2.bin", "truncated: the file holds 48 points"),
    "missing meta.json": (lambda f: (f / "meta.json").unlink(), "meta.json", "missing"),
    "malformed meta.json": (lambda f: (f / "meta.json").write_text('{"num_sequences": 3,'), "meta.json",
                            "malformed JSON"),
    "empty meta.json": (lambda f: (f / "meta.json").write_text(""), "meta.json", "empty file"),
    "missing field": (lambda f: edit_meta(f, lambda m: m.pop("scales")), "meta.json", "scales = None: missing field"),
    "wrong dtype": (lambda f: edit_meta(f, lambda m: m.update(dtype="float64")), "meta.json", "'float64'"),
    "non-integer length": (lambda f: edit_meta(f, lambda m: m["scales"][2].update(length="40")), "meta.json",
                           "scales[2].length = '40'"),
    "offset out of range": (lambda f: edit_meta(f, lambda m: m["scales"][1].update(offset=10**9)), "meta.json",
                            "scales[1].offset = 1000000000"),
    "count mismatch": (lambda f: edit_meta(f, lambda m: m.update(num_sequences=4)), "meta.json",
                       "num_sequences=4"),
    "mean without std": (lambda f: edit_meta(f, lambda m: m["scales"][0].update(mean=1.0)), "meta.json",
                         "scales[0].mean = 1.0"),
    "non-numeric json value": (lambda f: jsonl(f, '{"sequence": [1, 2, "abc", 4]}\n'), "part.jsonl", "'abc'"),
    "malformed json line": (lambda f: jsonl(f, '{"sequence": [1, 2]}\n{"sequence": [\n'), "part.jsonl", "line 2"),
    "empty jsonl": (lambda f: jsonl(f, ""), "part.jsonl", "empty file"),
    "bad npy": (lambda f: replace_files(f, "x.npy", b"not npy"), "x.npy", "not a valid .npy file"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_named_and_can_be_skipped(case, tmp_path):
    breaker, file_name, fragment = CASES[case]
    bad = good_corpus(tmp_path / "in")
    breaker(bad)
    with pytest.raises(PrepError) as raised:
        prepare(Time300BSource(str(tmp_path / "in")), tmp_path / "out", OPTIONS)
    message = str(raised.value)
    assert file_name in message and fragment in message, message
    assert Path(raised.value.file).name == file_name
    assert not list((tmp_path / "out").glob("shard-*")), "bad input is found before any shard is written"

    skip = PrepOptions(workers=1, progress=False, on_error="skip", overwrite=True)
    manifest = prepare(Time300BSource(str(tmp_path / "in")), tmp_path / "out", skip)
    [skipped] = manifest["skipped"]
    assert (skipped["domain"], skipped["dataset"]) == ("web", "bad")
    assert Path(skipped["file"]).name == file_name
    assert fragment in f"{skipped['field']} = {skipped['value']}: {skipped['problem']}"
    assert list(manifest["datasets"]) == ["energy/good"]
    assert {v[0] for v in read_all(tmp_path / "out").values()} == {"energy"}


def test_cli_reports_bad_input_with_exit_status_2_and_leaves_nothing_behind(tmp_path):
    truncate_bin(good_corpus(tmp_path / "in"))
    cmd = [sys.executable, "-m", "data_prep.cli", "--source", "time300b", "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "timemoe-prep: error:" in result.stderr and "data-1-of-2.bin" in result.stderr
    # energy/good was indexed before web/bad failed: that is no interrupted job to resume, and it is gone
    assert not (tmp_path / "out").exists()
    result = subprocess.run(cmd + ["--on-error", "skip"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and "skipped web/bad" in result.stdout
    assert load_manifest(tmp_path / "out")["skipped"][0]["dataset"] == "bad"


@pytest.mark.parametrize(
    "text, layout, fragment",
    [
        ("date,a,b\n2020-01-01,1,2\n", TableLayout(timestamp_column="when"), "column = 'when': missing"),
        ("when,a\n2020-01-01,1\n", TableLayout(), "column = 'timestamp': missing"),
        ("id,timestamp,v,w\nx,2020-01-01,1,2\n", TableLayout(), "column = 'value': missing"),
        ("id,timestamp,value\nx,2020-01-01,1\nx,2020-01-02,seven\n", TableLayout(), "row 2 = 'seven': not a number"),
        ("id,timestamp,value\nx,2020-01-01,1\nx,2020-01-01,2\n", TableLayout(), "repeated timestamp in series x"),
        ("timestamp,a\nyesterday,1\n", TableLayout(), "'yesterday': not a timestamp"),
        ("", TableLayout(), "empty file"),
    ],
    ids=["missing given column", "no timestamp column", "no value column", "non-numeric", "repeated timestamp",
         "bad timestamp", "empty"],
)
def test_bad_csv_is_named(text, layout, fragment, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(text)
    with pytest.raises(PrepError) as raised:
        prepare(TableSource("csv", str(path), layout=layout), tmp_path / "out", OPTIONS)
    assert str(path) in str(raised.value) and fragment in str(raised.value), str(raised.value)
