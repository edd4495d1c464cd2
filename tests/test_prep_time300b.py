"""timemoe-prep on a Time-300B-layout corpus written here: exact points, manifest, determinism, resuming."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import CleanOptions, PrepError, PrepOptions, load_manifest, prepare, read_shard, verify_shards
from data_prep.sources import Time300BSource

REPO = Path(__file__).resolve().parents[1]


def write_bin_dataset(folder: Path, sequences: list[np.ndarray], *, split_at: int, scaled: set[int] = frozenset(),
                      gap_before: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Write meta.json + two .bin files (the cut at ``split_at`` points); returns the expected output per sequence.

    Sequences in ``scaled`` are stored normalised with a mean/std entry; ``gap_before`` leaves three unused points
    in the stream before that sequence, so offsets are not simply consecutive.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    stream, scales, expected = [], [], []
    offset = 0
    for i, original in enumerate(sequences):
        if i == gap_before:
            stream.append(np.full(3, 999.0, np.float32))
            offset += 3
        entry = {"offset": offset, "length": int(original.size)}
        if i in scaled:
            mean, std = float(rng.normal(50, 10)), float(rng.uniform(0.5, 3))
            stored = ((original - mean) / std).astype(np.float32)
            entry |= {"mean": mean, "std": std}
            expected.append((stored.astype(np.float64) * std + mean).astype(np.float32))
        else:
            stored = original.astype(np.float32)
            expected.append(stored)
        stream.append(stored)
        scales.append(entry)
        offset += original.size
    data = np.concatenate(stream)
    assert 0 < split_at < data.size
    data[:split_at].tofile(folder / "data-0-of-2.bin")
    data[split_at:].tofile(folder / "data-1-of-2.bin")
    meta = {
        "num_sequences": len(sequences),
        "dtype": "float32",
        "files": {"data-1-of-2.bin": int(data.size - split_at), "data-0-of-2.bin": split_at},  # order: by i, not key
        "scales": scales,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return expected


def make_corpus(root: Path) -> dict[str, tuple[str, str, np.ndarray]]:
    """Several domains and layouts; returns item_id -> (domain, dataset, expected float32 points)."""
    rng = np.random.default_rng(7)
    seqs = lambda *lengths: [rng.normal(0, 5, n).astype(np.float32) for n in lengths]  # noqa: E731
    expected: dict[str, tuple[str, str, np.ndarray]] = {}

    energy = seqs(40, 300, 57, 120)
    # sequence 1 (offset 40, 300 points) straddles the two files
    out = write_bin_dataset(root / "energy" / "grid", energy, split_at=200, scaled={0, 1, 3}, gap_before=2)
    expected |= {f"energy/grid/{i}": ("energy", "grid", v) for i, v in enumerate(out)}

    finance = seqs(64, 64, 80)
    out = write_bin_dataset(root / "finance" / "stocks" / "daily", finance, split_at=100)
    expected |= {f"finance/stocks/daily/{i}": ("finance", "stocks/daily", v) for i, v in enumerate(out)}

    web = root / "web" / "clicks"
    web.mkdir(parents=True)
    for part, lengths in (("part-0.jsonl", (30, 45)), ("part-1.json", (70,))):
        lines = []
        for n, values in enumerate(seqs(*lengths), start=1):
            lines.append(json.dumps({"sequence": values.astype(np.float64).tolist()}))
            expected[f"web/clicks/{part}:{n}"] = ("web", "clicks", values)
        (web / part).write_text("\n".join(lines) + "\n")

    rivers = np.stack(seqs(50, 50, 50)).astype(np.float64)
    (root / "nature").mkdir()
    np.save(root / "nature" / "rivers.npy", rivers)
    expected |= {f"nature/rivers/rivers/{r}": ("nature", "rivers", rivers[r].astype(np.float32)) for r in range(3)}
    (root / "README.md").write_text("not data")
    return expected


def read_all(out: Path) -> dict[str, tuple[str, str, np.ndarray]]:
    got = {}
    for shard in load_manifest(out)["shards"]:
        table = read_shard(out / shard["file"])
        for row in table.to_pylist():
            assert row["item_id"] not in got
            got[row["item_id"]] = (row["domain"], row["dataset"], np.asarray(row["target"], np.float32))
    return got


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


QUIET = dict(progress=False, shard_bytes=1536)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("time300b")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def packed(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    prepare(Time300BSource(str(corpus[0])), out, PrepOptions(workers=1, **QUIET))
    return out


def test_every_point_comes_out_exactly_under_its_domain_and_dataset(corpus, packed):
    _, expected = corpus
    got = read_all(packed)
    assert sorted(got) == sorted(expected)
    for item_id, (domain, dataset, values) in expected.items():
        g_domain, g_dataset, g_values = got[item_id]
        assert (g_domain, g_dataset) == (domain, dataset), item_id
        assert g_values.dtype == np.float32 and np.array_equal(g_values, values), item_id
    assert len(load_manifest(packed)["shards"]) > 1


def test_manifest_counts_and_checksums_match_the_shards(corpus, packed):
    _, expected = corpus
    manifest = load_manifest(packed)
    per_domain: dict[str, list[int]] = {}
    per_dataset: dict[str, list[int]] = {}
    for domain, dataset, values in expected.values():
        for table, key in ((per_domain, domain), (per_dataset, f"{domain}/{dataset}")):
            table.setdefault(key, [0, 0])
            table[key][0] += 1
            table[key][1] += values.size
    assert {k: [v["sequences"], v["points"]] for k, v in manifest["domains"].items()} == per_domain
    assert {k: [v["sequences"], v["points"]] for k, v in manifest["datasets"].items()} == per_dataset
    assert manifest["totals"]["points"] == sum(v[2].size for v in expected.values())
    for shard in manifest["shards"]:
        path = packed / shard["file"]
        table = read_shard(path)
        assert shard["rows"] == table.num_rows
        assert shard["points"] == sum(len(t) for t in table.column("target").to_pylist())
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["bytes"] == path.stat().st_size
    verify_shards(packed)
    files = [s["file"] for s in manifest["shards"]] + [s["stats"]["file"] for s in manifest["shards"]]
    assert sorted(p.name for p in packed.iterdir()) == sorted(files + ["manifest.json"])
    assert manifest["ignored"] == [{"file": str(corpus[0] / "README.md"), "reason": "not under a <domain>/ folder"}]
    assert manifest["source"]["name"] == "time300b" and manifest["schema_version"] == 1


def test_corrupted_shard_fails_verification(packed, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    first = copy / load_manifest(copy)["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-100] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(PrepError, match="sha256"):
        verify_shards(copy)


def test_datasets_load_dataset_reads_a_shard(packed):
    import datasets

    manifest = load_manifest(packed)
    files = [str(packed / s["file"]) for s in manifest["shards"]]
    ds = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(packed.parent / "hf-cache"))
    assert ds.num_rows == manifest["totals"]["sequences"]
    assert set(ds.column_names) == {"item_id", "domain", "dataset", "freq", "target"}
    assert sum(len(t) for t in ds["target"]) == manifest["totals"]["points"]


def test_without_denormalisation_values_stay_as_stored(corpus, tmp_path):
    prepare(Time300BSource(str(corpus[0]), denormalize=False), tmp_path, PrepOptions(workers=1, **QUIET))
    stored = np.fromfile(corpus[0] / "energy" / "grid" / "data-0-of-2.bin", np.float32)
    assert np.array_equal(read_all(tmp_path)["energy/grid/0"][2], stored[:40])


def test_workers_1_and_2_give_identical_bytes(corpus, packed, tmp_path):
    prepare(Time300BSource(str(corpus[0])), tmp_path, PrepOptions(workers=2, **QUIET))
    assert folder_bytes(tmp_path) == folder_bytes(packed)


def test_rerun_of_a_finished_job_changes_nothing_and_other_options_are_refused(corpus, packed):
    before = folder_bytes(packed)
    prepare(Time300BSource(str(corpus[0])), packed, PrepOptions(workers=1, **QUIET))
    assert folder_bytes(packed) == before
    with pytest.raises(PrepError, match="--overwrite"):
        prepare(Time300BSource(str(corpus[0])), packed, PrepOptions(workers=1, progress=False, shard_bytes=8192))
    assert folder_bytes(packed) == before


def test_cleaning_rules_are_counted(tmp_path):
    nan = None
    ramp = [float(i) for i in range(40)]
    lines = {
        "short_gap": ramp[:10] + [nan, nan] + ramp[12:],  # interpolated: 2 points
        "long_gap": ramp[:20] + [nan] * 9 + ramp[29:],  # 9 > max_gap: split into 20 + 11 (11 < 16: dropped)
        "edges": [nan, nan] + ramp[2:38] + [nan],  # two edge runs, 3 points
        "short": ramp[:15],
        "constant": [3.0] * 30,
    }
    folder = tmp_path / "in" / "sales" / "shop"
    folder.mkdir(parents=True)
    (folder / "s.jsonl").write_text("".join(json.dumps({"sequence": v}) + "\n" for v in lines.values()))
    manifest = prepare(Time300BSource(str(tmp_path / "in")), tmp_path / "out", PrepOptions(workers=1, progress=False))
    rules = manifest["cleaning"]["rules"]
    assert rules["interpolated_gaps"] == {"count": 1, "points": 2}
    assert rules["split_at_gaps"] == {"count": 1, "points": 9}
    assert rules["trimmed_edges"] == {"count": 2, "points": 3}
    assert rules["dropped_short"] == {"count": 2, "points": 15 + 11}
    assert rules["dropped_constant"] == {"count": 1, "points": 30}
    got = read_all(tmp_path / "out")
    assert sorted(got) == ["sales/shop/s.jsonl:1", "sales/shop/s.jsonl:2@0", "sales/shop/s.jsonl:3"]
    assert np.array_equal(got["sales/shop/s.jsonl:1"][2], np.arange(40, dtype=np.float32))  # linear fill
    assert np.array_equal(got["sales/shop/s.jsonl:2@0"][2], np.arange(20, dtype=np.float32))
    removed = sum(rules[r]["points"] for r in ("trimmed_edges", "split_at_gaps", "dropped_short", "dropped_constant"))
    assert manifest["cleaning"]["input"]["points"] - removed == manifest["cleaning"]["output"]["points"]
    assert manifest["datasets"]["sales/shop"]["cleaning"]["dropped_constant"]["count"] == 1


def _big_corpus(root: Path) -> None:
    rng = np.random.default_rng(1)
    for domain in ("energy", "web"):
        lengths = rng.integers(200, 2000, 300)
        write_bin_dataset(root / domain / "big", [rng.normal(size=n).astype(np.float32) for n in lengths],
                          split_at=int(lengths.sum() // 2), scaled={0, 5, 9})


def _cli(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", "--source", "time300b", "--input", str(root), "--output",
            str(out), "--workers", "1", "--shard-size", "32KB", "--no-progress"]


def test_killed_run_resumes_to_identical_output(tmp_path):
    root = tmp_path / "in"
    _big_corpus(root)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_cli(root, reference), check=True, cwd=REPO, capture_output=True)
    total = load_manifest(reference)["totals"]["shards"]
    assert total > 20

    proc = subprocess.Popen(_cli(root, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(killed.glob("shard-*.arrow")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = list(killed.glob("shard-*.arrow"))
    assert 0 < len(written) < total and not (killed / "manifest.json").exists(), "the kill must land mid-way"

    subprocess.run(_cli(root, killed), check=True, cwd=REPO, capture_output=True)
    assert folder_bytes(killed) == folder_bytes(reference)


def test_failure_mid_way_keeps_finished_shards_and_resume_rebuilds_damaged_ones(corpus, packed, tmp_path, monkeypatch):
    import data_prep.build as build

    real = build.clean_batch
    batches = sum(len(s["datasets"]) for s in load_manifest(packed)["shards"])  # one batch per slice here
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == batches:  # the last shard's last batch
            raise RuntimeError("injected failure")
        return real(*args)

    monkeypatch.setattr(build, "clean_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(Time300BSource(str(corpus[0])), tmp_path, PrepOptions(workers=1, **QUIET))
    done = sorted(p.name for p in tmp_path.glob("shard-*.arrow"))
    assert done and not list(tmp_path.glob("*.partial")) and not (tmp_path / "manifest.json").exists()
    for name in done:  # what was written is whole and final
        assert (tmp_path / name).read_bytes() == (packed / name).read_bytes()
    monkeypatch.setattr(build, "clean_batch", real)
    torn = tmp_path / done[0]  # as a machine crash could leave it: right size, wrong bytes
    data = bytearray(torn.read_bytes())
    data[len(data) // 2] ^= 0xFF
    torn.write_bytes(bytes(data))
    prepare(Time300BSource(str(corpus[0])), tmp_path, PrepOptions(workers=1, **QUIET))
    assert folder_bytes(tmp_path) == folder_bytes(packed)


def test_inspect_prints_a_table_per_domain_and_writes_a_png(packed, tmp_path):
    png = tmp_path / "samples.png"
    result = subprocess.run([sys.executable, "-m", "data_prep.cli", "inspect", str(packed), "--plot", str(png),
                             "--verify"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("domain"))
    assert "sequences" in header and "len p50" in header
    for domain in ("energy", "finance", "nature", "web"):
        assert any(line.startswith(domain) for line in lines), domain
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clean_options_validate():
    with pytest.raises(ValueError):
        CleanOptions(min_length=0)


@pytest.mark.parametrize("lengths", [[300, 500, 1000], [3, 5, 2, 7, 0]], ids=["long: slice loop", "short: repeat"])
def test_denormalisation_paths_agree_with_the_formula(lengths):
    from data_prep.index import _denormalize

    rng = np.random.default_rng(0)
    length = np.array(lengths)
    values = rng.normal(size=length.sum()).astype(np.float32)
    mean, std = rng.normal(size=length.size), rng.uniform(0.5, 2, length.size)
    starts = np.cumsum(length) - length
    expected = [values[a : a + n].astype(np.float64) * s + m for a, n, m, s in zip(starts, length, mean, std)]
    assert np.array_equal(_denormalize(values, length, mean, std), np.concatenate(expected))
