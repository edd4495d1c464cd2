"""`timemoe-forecast --out OUT/` as users run it (the installed command, from outside the checkout): Parquet shards
named after their inputs, forecasts equal to the released-style reference, memory that does not grow with the
number of series, a run killed with SIGKILL and run again, bad input in one shard, and two processes writing
exactly what one writes."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_data_shards import write_corpus
from test_remote_code import export_with_reference, load_remote, make_ours
from timemoe_train.model import TimeMoeForPrediction

COMMAND = str(Path(sys.executable).parent / "timemoe-forecast")
LAST_LINE = re.compile(r"^forecast: (\d+) series × (\d+) steps in [\d.]+ s, [\d.]+ series/s on (\d+) processes$")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread everywhere: one and two processes compute alike


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(our export, its copy running the released-style reference code)."""
    return export_with_reference(make_ours(), tmp_path_factory.mktemp("model"))


def run(model_dir, *args, cwd, timeout=600):
    return subprocess.run([COMMAND, str(model_dir), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=ENV)


def walks(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [("energy", "d0", (rng.uniform(-5, 50) + rng.standard_normal(n).cumsum() * rng.uniform(0.1, 10))
             .astype(np.float32)) for n in lengths]


def read_folder(out: Path) -> pd.DataFrame:
    """The folder as a user reads it: one Parquet dataset, parts in name order (the record and log are no part)."""
    return pd.read_parquet(out)


def test_corpus_to_shards_equals_the_reference(dirs, tmp_path):
    """Mixed context lengths (shorter than, equal to and longer than --context-length) in parts of 7 series of
    three input shards: each forecast equals the released-style code's on its own context within 1e-4."""
    exported, reference = dirs
    lengths = [3, 48, 120, 17, 48, 200, 5, 90, 33, 48, 61, 1, 150, 48, 29, 77, 64, 12, 300, 48]
    series = walks(lengths)
    corpus = write_corpus(tmp_path / "corpus", series, num_shards=3)
    proc = run(exported, "--input", corpus, "--horizon", 40, "--context-length", 48, "--series-per-shard", 3,
               "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert LAST_LINE.match(lines[-1]).groups() == ("20", "40", "1"), lines[-1]
    assert f"{len([n for n in lengths if n < 48])} of 20 series are shorter than --context-length 48" in proc.stderr
    # Shard k of the corpus (7, 7, 6 series) in parts of 3: named after its input, in input order.
    names = sorted(p.name for p in (tmp_path / "out").glob("*.parquet"))
    assert names == [f"shard-{k:05d}-of-00003.arrow.{j:05d}-of-{n:05d}.parquet"
                     for k, n in enumerate((3, 3, 2)) for j in range(n)]
    log = (tmp_path / "out" / "_forecast.log").read_text()
    assert len(re.findall(r"series/s, \d+ shards written.*; wrote shard-", log)) == len(names)

    out = read_folder(tmp_path / "out")
    assert list(out.columns) == ["item_id", "step", "forecast"] and len(out) == 20 * 40
    assert list(out.item_id.unique()) == [f"item{i}" for i in range(20)]
    model = load_remote(reference)
    for i, (_, _, values) in enumerate(series):
        context_1T = torch.from_numpy(values[-48:])[None]
        want = model.forecast(context_1T, 40)[0].numpy()
        got = out.forecast.to_numpy()[i * 40:(i + 1) * 40]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"item{i} ({lengths[i]} points)"
    assert (out.step.to_numpy() == np.tile(np.arange(1, 41), 20)).all()


# The command run by a small process that reports its peak RSS: measured by a process forked from this one, whose
# memory it shares until its exec, it would count this test's memory too.
PEAK_RSS = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, use = os.wait4(p.pid, 0); " \
           "print(use.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))"


def peak_rss_mb(cmd, cwd) -> tuple[float, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)
    return int(proc.stdout.split()[-1]) / 1024, proc


def test_memory_does_not_grow_with_the_number_of_series(dirs, tmp_path):
    """Ten times the series (of 1,000 points: 8 vs 80 MB of input) in parts of 500: the same peak memory. A reader
    of the whole input would hold every series (or every page of the memory-mapped shards) at once."""
    exported, _ = dirs
    peaks = {}
    for n in (2_000, 20_000):
        rng = np.random.default_rng(n)
        values = rng.standard_normal((n, 1000)).astype(np.float32).cumsum(axis=1)
        corpus = write_corpus(tmp_path / f"corpus{n}", [("web", "w", v) for v in values], num_shards=4, stats=False)
        cmd = [COMMAND, str(exported), "--input", str(corpus), "--horizon", "8", "--context-length", "64",
               "--series-per-shard", "500", "--out", str(tmp_path / f"out{n}"), "--no-progress"]
        peaks[n], proc = peak_rss_mb(cmd, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert LAST_LINE.match(proc.stderr.strip().splitlines()[-1]).group(1) == str(n)
    assert peaks[20_000] - peaks[2_000] < 20, f"peak RSS {peaks} MB: 72 MB more input held at once?"


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow.parquet as pq
    from timemoe_train.forecast import cli, output

    write_table = pq.write_table

    def slow(table, where, **kwargs):  # every shard sits under its temporary name for a while
        write_table(table, where, **kwargs)
        time.sleep(0.5)

    output.pq.write_table = slow
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_killed_run_resumes_with_every_series_once(dirs, tmp_path):
    exported, _ = dirs
    series = walks([60 + 7 * i for i in range(32)], seed=3)
    corpus = write_corpus(tmp_path / "corpus", series, num_shards=2)
    out = tmp_path / "out"
    args = ["--input", corpus, "--horizon", 12, "--context-length", 32, "--series-per-shard", 2, "--out", out]
    (tmp_path / "slow.py").write_text(SLOW_WRITER)
    killed = subprocess.Popen([sys.executable, str(tmp_path / "slow.py"), str(exported), *map(str, args)],
                              cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.parquet"))) < 3 or not list(out.glob(".*.partial")):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = len(list(out.glob("*.parquet")))
    assert 3 <= done < 16 and list(out.glob(".*.partial"))  # killed mid-write

    proc = run(exported, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{done} shards ({2 * done} series) already in {out}: skipped" in proc.stderr
    assert LAST_LINE.match(proc.stderr.strip().splitlines()[-1]).group(1) == str(32 - 2 * done)
    assert not list(out.glob(".*.partial"))
    resumed = read_folder(out)
    assert sorted(resumed.item_id.value_counts().to_dict().items()) == sorted((f"item{i}", 12) for i in range(32))

    whole = tmp_path / "whole"
    assert run(exported, *args[:-1], whole, cwd=tmp_path).returncode == 0
    pd.testing.assert_frame_equal(resumed, read_folder(whole))

    again = run(exported, *args, cwd=tmp_path)  # nothing left: says so, forecasts nothing
    assert again.returncode == 0 and "16 shards (32 series) already in" in again.stderr
    assert LAST_LINE.match(again.stderr.strip().splitlines()[-1]).group(1) == "0"
    other = run(exported, *args[:3], 24, *args[4:], cwd=tmp_path)  # another horizon into the same folder
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "horizon = 12" in other.stderr and "24" in other.stderr


def write_csvs(folder: Path, bad: str | None = None) -> Path:
    folder.mkdir()
    for k, name in enumerate("abc"):
        times = pd.date_range("2024-01-01", periods=50, freq="h")
        frame = pd.DataFrame({"date": times.strftime("%Y-%m-%d %H:%M:%S"),
                              **{f"{name}{i}": np.sin(np.arange(50) / (3 + i + k)) * 10 + k for i in range(4)}})
        frame = frame.astype({f"{name}2": object})
        if name == bad:
            frame.loc[36, f"{name}2"] = "n/a?"
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


def test_bad_input_in_one_shard_stops_with_one_line_and_keeps_the_finished(dirs, tmp_path):
    exported, _ = dirs
    inputs = write_csvs(tmp_path / "csvs", bad="b")
    out = tmp_path / "out"
    args = ["--input", inputs, "--horizon", 5, "--context-length", 24, "--out", out]
    proc = run(exported, *args, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "b.csv" in lines[0] and "'b2'" in lines[0] and "row 37" in lines[0], lines
    assert sorted(p.name for p in out.glob("*.parquet")) == ["a.csv.00000-of-00001.parquet"]

    write_csvs(tmp_path / "fixed")
    (inputs / "b.csv").write_text((tmp_path / "fixed" / "b.csv").read_text())
    proc = run(exported, *args, cwd=tmp_path)
    assert proc.returncode == 0 and "1 shards (4 series) already in" in proc.stderr
    frame = read_folder(out)
    assert list(frame.columns) == ["item_id", "timestamp", "forecast"]
    assert list(frame.item_id.unique()) == [f"{n}{i}" for n in "abc" for i in range(4)]
    assert (frame.timestamp.iloc[:5] == pd.date_range("2024-01-03 02:00", periods=5, freq="h")).all()


@pytest.mark.slow
def test_two_processes_write_what_one_writes(dirs, tmp_path):
    exported, _ = dirs
    corpus = write_corpus(tmp_path / "corpus", walks([20 + 13 * (i % 9) for i in range(45)], seed=5), num_shards=3)
    args = ["--input", corpus, "--horizon", 20, "--context-length", 64, "--series-per-shard", 4]
    one = run(exported, *args, "--out", tmp_path / "one", cwd=tmp_path)
    two = run(exported, *args, "--out", tmp_path / "two", "--nproc-per-node", 2, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert LAST_LINE.match(two.stderr.strip().splitlines()[-1]).groups() == ("45", "20", "2")
    assert "[rank 1 of 2]" in (tmp_path / "two" / "_forecast.log").read_text()
    names = sorted(p.name for p in (tmp_path / "one").glob("*.parquet"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.parquet")) and len(names) == 12
    for name in names:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / name),
                                      pd.read_parquet(tmp_path / "two" / name))
    assert not list((tmp_path / "two").glob(".*"))  # the processes' tallies read and removed

    inputs = write_csvs(tmp_path / "csvs", bad="c")
    bad = run(exported, "--input", inputs, "--horizon", 5, "--context-length", 24, "--out", tmp_path / "bad",
              "--nproc-per-node", 2, "--no-progress", cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "c.csv" in lines[0] and "row 37" in lines[0], lines


def test_tables_of_one_row_per_series_are_read_part_by_part(dirs, tmp_path):
    """A folder of a Parquet file (row groups of 3) and an Arrow file (record batches of 4), one row per series,
    list targets with missing points and integers: parts of 5 series read from the row groups and batches that
    hold them, the missing points dealt with as for a CSV, forecasts equal to the library's on those contexts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from timemoe_train.forecast.inputs import finite_tail

    exported, _ = dirs
    rng = np.random.default_rng(7)
    folder = tmp_path / "tables"
    folder.mkdir()
    rows = {}
    for name, n in (("a.parquet", 11), ("b.arrow", 9)):
        targets = [list(np.round(rng.standard_normal(rng.integers(5, 70)).cumsum() * 10, 2)) for _ in range(n)]
        targets[2][-3:] = [None] * 3  # trailing gap: the context ends at the last real point
        targets[4][-5] = None  # an inner one, filled linearly
        ids = [f"{name[0]}{i}" for i in range(n)]
        if name == "b.arrow":
            targets[5] = [int(v) for v in targets[5]]  # integers are numbers too
            table = pa.table({"item_id": ids, "target": pa.array(targets, pa.list_(pa.float64()))})
            with pa.ipc.new_file(folder / name, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=4):
                    writer.write_batch(batch)
        else:
            pq.write_table(pa.table({"item_id": ids, "target": targets}), folder / name, row_group_size=3)
        rows.update({i: np.array(t, dtype=np.float64) for i, t in zip(ids, targets)})
    proc = run(exported, "--input", folder, "--horizon", 9, "--context-length", 40, "--series-per-shard", 5,
               "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 missing points inside the contexts filled linearly" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == \
        [f"a.parquet.{j:05d}-of-00003.parquet" for j in range(3)] + [f"b.arrow.{j:05d}-of-00002.parquet"
                                                                   for j in range(2)]
    out = read_folder(tmp_path / "out")
    assert list(out.item_id.unique()) == list(rows)
    model = TimeMoeForPrediction.from_pretrained(exported).eval()
    for item, points in rows.items():
        context = finite_tail(folder, item, points, 40)[0]
        want = model.forecast(torch.from_numpy(context)[None], 9)[0].numpy()
        got = out.forecast[out.item_id == item].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=item)
