"""The sample plan and its cache: the stream equals the one before the cache existed, the cache is keyed by
everything it depends on, damaged files are never used, concurrent processes build it once, held-out tails stay
out of training, and timemoe-prep's per-sequence statistics are those the loader used to compute."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from bisect import bisect_right
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_loader import take
from test_data_shards import write_corpus
from test_data_windows import global_rows, labelled_transitions
from test_prep_time300b import QUIET, make_corpus

from data_prep import PrepOptions, prepare, verify_shards
from data_prep.errors import PrepError
from data_prep.moments import moments, sequence_moments
from data_prep.shards import read_shard, read_stats
from data_prep.sources import Time300BSource
from timemoe_train.data import DataConfig, DataError, build_train_loader
from timemoe_train.data.corpus import read_manifest
from timemoe_train.data.plan import compute_plan
from timemoe_train.data.stream import SampleStream
from timemoe_train.data.windows import pack

REPO = Path(__file__).resolve().parents[1]
# Main's SampleStream (commit 99ae16a, before the plan existed) on golden_corpus: GOLDEN_ROWS of every
# configuration, as "<configuration>.<array>".
GOLDEN = REPO / "tests" / "data" / "stream_golden.npz"
GOLDEN_ROWS = np.concatenate([np.arange(48), np.arange(5000, 5016), np.arange(70_000, 70_016)])
# main's default normalization was "sequence"; stated here since the default has become "window".
GOLDEN_CONFIGS = {
    "default": dict(max_length=24, normalization="sequence"),
    "random": dict(max_length=24, window_mode="random", normalization="sequence"),
    "unpacked": dict(max_length=24, packing=False, normalization="sequence"),
    "window_norm": dict(max_length=24, normalization="window"),
    "no_norm": dict(max_length=24, normalization="none", stride=10),
    "datasets": dict(max_length=16, normalization="sequence", mixture_by="dataset", mixture_block=7,
                     mixture_temperature=2.0, mixture_weights={"energy/e1": 1.0, "energy/e2": 2.0, "web/w1": 3.0}),
    "seed": dict(max_length=32, seed=5, window_mode="random", stride=8, normalization="sequence"),
}


def golden_corpus(directory: Path) -> Path:
    """Short, long and constant series in three domains and four datasets over three shards."""
    rng = np.random.default_rng(12)
    series = []
    for domain, dataset, n, high in (("energy", "e1", 40, 60), ("energy", "e2", 15, 400), ("nature", "n1", 10, 1500),
                                     ("web", "w1", 30, 30)):
        for length in rng.integers(2, high, n):
            values = rng.gamma(2.0, 3.0, length) * rng.choice([1.0, 0.0, 1e3], p=[0.8, 0.1, 0.1])
            series.append((domain, dataset, values.astype(np.float32)))
    order = rng.permutation(len(series))
    return write_corpus(directory, [series[i] for i in order], num_shards=3)


def config(path, plan_dir, **overrides) -> DataConfig:
    """"sequence" normalisation unless overridden: the plan then carries the statistics these tests look at."""
    return DataConfig(**{"path": str(path), "plan_dir": str(plan_dir), "num_workers": 0, "max_length": 24,
                         "normalization": "sequence", **overrides})


def plan_files(plan_dir: Path) -> list[Path]:
    return sorted(plan_dir.glob("plan-*.bin"))


@pytest.fixture(scope="module")
def golden_dirs(tmp_path_factory):
    """The golden corpus with timemoe-prep's statistics files and without (as an older prep wrote it)."""
    root = tmp_path_factory.mktemp("golden")
    with_stats = golden_corpus(root / "with")
    without = root / "without"
    without.mkdir()
    for p in with_stats.iterdir():
        if not p.name.endswith(".stats.npy"):
            (without / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((without / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["stats"]
    (without / "manifest.json").write_text(json.dumps(manifest))
    return {"prep statistics": with_stats, "no statistics": without}


@pytest.mark.parametrize("stats", ["prep statistics", "no statistics"])
def test_stream_is_bit_identical_to_the_one_before_the_plan_cache(golden_dirs, stats, tmp_path):
    golden = np.load(GOLDEN)
    for name, overrides in GOLDEN_CONFIGS.items():
        cfg = DataConfig(path=str(golden_dirs[stats]), num_workers=0, plan_dir=str(tmp_path), **overrides)
        batch = build_train_loader(cfg).stream.batch(GOLDEN_ROWS)
        for k, v in batch.items():
            np.testing.assert_array_equal(v, golden[f"{name}.{k}"], err_msg=f"{name}: {k}")


def test_cached_and_uncached_plans_give_identical_batches(golden_dirs, tmp_path):
    path = golden_dirs["prep statistics"]
    for name, overrides in GOLDEN_CONFIGS.items():
        cfg = config(path, tmp_path, **overrides)
        cached = build_train_loader(cfg, global_batch_size=8, micro_batch_size=4)
        assert cached.stream.plan.path is not None
        manifest = read_manifest(path)
        uncached = SampleStream(manifest, cfg, compute_plan(manifest, cfg))
        rows = np.arange(0, 4000, 37)
        for k, v in cached.stream.batch(rows).items():
            np.testing.assert_array_equal(v, uncached.batch(rows)[k], err_msg=f"{name}: {k}")
        # A spawned worker gets the plan's file name, not its arrays, and maps the same batches.
        assert len(pickle.dumps(cached.stream.plan)) < 4096
        assert len(pickle.dumps(uncached.plan)) > sum(a.nbytes for a in uncached.plan.arrays.values())
        copy = pickle.loads(pickle.dumps(cached.stream))
        assert copy.plan.path == cached.stream.plan.path
        for k, v in copy.batch(rows).items():
            np.testing.assert_array_equal(v, uncached.batch(rows)[k])


def test_a_process_keeps_few_shards_open(golden_dirs, tmp_path, monkeypatch):
    import timemoe_train.data.shards as shards

    cfg = config(golden_dirs["prep statistics"], tmp_path)
    expected = build_train_loader(cfg).stream.batch(np.arange(64))
    monkeypatch.setattr(shards, "_OPEN_SHARDS", 1)
    monkeypatch.setattr(shards, "_OPEN_CHUNKS", 2)
    stream = build_train_loader(cfg).stream
    for k, v in stream.batch(np.arange(64)).items():
        np.testing.assert_array_equal(v, expected[k])
    assert len(stream.store._readers) == 1 and len(stream.store._chunks) == 2


def test_workers_stream_equals_in_process_stream(golden_dirs, tmp_path):
    cfg = config(golden_dirs["prep statistics"], tmp_path)
    inline = take(build_train_loader(cfg, 0, 1, 8, 4), 6)
    workers = take(build_train_loader(config(golden_dirs["prep statistics"], tmp_path, num_workers=2), 0, 1, 8, 4), 6)
    for a, b in zip(inline, workers):
        for k in a:
            assert torch.equal(a[k], b[k]), k


PLAN_CHANGES = [dict(max_length=16), dict(window_mode="random"), dict(stride=10), dict(packing=False),
                dict(mixture_by="dataset"), dict(seed=3), dict(holdout_points=2), dict(normalization="window")]


def test_every_plan_relevant_change_builds_a_new_plan_and_others_reuse_it(golden_dirs, tmp_path):
    path = golden_dirs["prep statistics"]
    base = build_train_loader(config(path, tmp_path)).stream.plan.path
    built = {base}
    for change in PLAN_CHANGES:
        plan = build_train_loader(config(path, tmp_path, **change)).stream.plan.path
        assert plan not in built, change
        built.add(plan)
    assert set(plan_files(tmp_path)) == built
    # The mixture and how pieces are normalised are applied at batch time: the same plan serves them.
    for same in (dict(mixture_weights={"energy": 1.0}), dict(mixture_temperature=3.0), dict(mixture_block=5),
                 dict(num_workers=1), dict(normalization="window", mixture_weights={"web": 1.0})):
        assert build_train_loader(config(path, tmp_path, **same)).stream.plan.path in built, same
    assert set(plan_files(tmp_path)) == built


def test_a_changed_corpus_builds_a_new_plan(tmp_path):
    rng = np.random.default_rng(0)
    series = [("energy", "e", rng.normal(size=n).astype(np.float32)) for n in (5, 30, 70)]
    first = build_train_loader(config(write_corpus(tmp_path / "c", series), tmp_path / "plans")).stream.plan
    series[1] = ("energy", "e", series[1][2] + 1)  # same lengths, other points: other shard hashes and statistics
    second = build_train_loader(config(write_corpus(tmp_path / "c", series), tmp_path / "plans")).stream.plan
    assert first.path != second.path and len(plan_files(tmp_path / "plans")) == 2
    assert not np.array_equal(first.arrays["stats_S2"], second.arrays["stats_S2"])


@pytest.mark.parametrize("damage", ["truncated", "foreign", "flipped byte"])
def test_a_damaged_plan_is_rebuilt_and_refused_where_it_cannot_be(golden_dirs, tmp_path, caplog, damage):
    path = golden_dirs["prep statistics"]
    cfg = config(path, tmp_path, verify_checksums=damage == "flipped byte")
    good = build_train_loader(cfg)
    plan_file = good.stream.plan.path
    expected = good.stream.batch(np.arange(40))
    data = bytearray(plan_file.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "foreign":
        data = build_train_loader(config(path, tmp_path / "other", seed=9)).stream.plan.path.read_bytes()
    else:
        data[len(data) // 2] ^= 0x10
    plan_file.write_bytes(bytes(data))
    why = {"truncated": "truncated or torn", "foreign": "built for another corpus or configuration",
           "flipped byte": "damaged: sha256"}[damage]
    with caplog.at_level(logging.WARNING):
        rebuilt = build_train_loader(cfg)
    assert why in caplog.text and rebuilt.stream.plan.path == plan_file
    for k, v in rebuilt.stream.batch(np.arange(40)).items():
        np.testing.assert_array_equal(v, expected[k])

    plan_file.write_bytes(bytes(data))
    (tmp_path / (plan_file.name + ".lock")).unlink()
    (tmp_path / (plan_file.name + ".lock")).mkdir()  # the plan directory cannot be written (even as root)
    with pytest.raises(DataError, match=f"plan_dir = .*no usable sample plan and nowhere to build one: .*{why}"):
        build_train_loader(cfg)


def test_read_only_corpus_builds_its_plan_in_the_user_cache(golden_dirs, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in golden_dirs["prep statistics"].iterdir():
        (corpus / p.name).write_bytes(p.read_bytes())
    (corpus / "plans").write_text("")  # <corpus>/plans cannot be made, as on a read-only corpus
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    loader = build_train_loader(DataConfig(path=str(corpus), max_length=24, num_workers=0))
    assert loader.stream.plan.path.parent == tmp_path / "cache" / "timemoe-train" / "plans"


BUILDER = textwrap.dedent("""
    import hashlib, logging, os, sys, time
    import torch.distributed as dist
    import timemoe_train.data.plan_cache as plan_cache
    from timemoe_train.data import DataConfig, build_train_loader
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    compute = plan_cache.plan_parts
    plan_cache.plan_parts = lambda *a: (time.sleep(1.5), compute(*a))[1]  # widen the window for a race
    if os.environ.get("WORLD_SIZE"):
        dist.init_process_group("gloo")
    go = sys.argv[3]
    open(go + f".ready{os.getpid()}", "w").close()
    while not os.path.exists(go):  # start building at the same moment
        time.sleep(0.01)
    loader = build_train_loader(DataConfig(path=sys.argv[1], plan_dir=sys.argv[2], max_length=24, num_workers=0),
                                global_batch_size=4, micro_batch_size=4)
    batch = next(iter(loader))
    print("PLAN", loader.stream.plan.path, hashlib.sha256(batch["inputs"].numpy().tobytes()).hexdigest())
""")


@pytest.mark.parametrize("launch", ["independent processes", "torch.distributed"])
def test_processes_starting_at_once_build_one_plan(golden_dirs, tmp_path, launch):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(3 if launch == "independent processes" else 2):
        extra = {} if launch == "independent processes" else {
            "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(golden_dirs["prep statistics"]),
                                       str(tmp_path / "plans"), str(go)], env={**env, **extra},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    while len(list(tmp_path.glob("go.ready*"))) < len(procs):
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    log = "".join(outputs)
    assert log.count("building the sample plan") == 1, log
    results = {line for out in outputs for line in out.splitlines() if line.startswith("PLAN")}
    assert len(results) == 1, results
    assert len(plan_files(tmp_path / "plans")) == 1 and not list((tmp_path / "plans").glob("*.tmp*"))


@pytest.mark.parametrize("window_mode", ["stride", "random"])
def test_held_out_tails_never_reach_a_training_batch(tmp_path, window_mode):
    holdout = 6
    lengths = [1, 7, 8, 9, 20, 30, 33, 50, 90]
    series = [("energy", "e", 1000.0 * s + np.arange(n)) for s, n in enumerate(lengths)]
    cfg = dict(max_length=16, window_mode=window_mode, holdout_points=holdout)
    loader = build_train_loader(DataConfig(path=str(write_corpus(tmp_path / "a", series)), num_workers=0,
                                           plan_dir=str(tmp_path / "plans"), **cfg))
    units = loader.stream.groups[0].num_units
    rows = global_rows(tmp_path / "a", 3 * units, normalization="none", plan_dir=str(tmp_path / "plans"), **cfg)
    points = rows["inputs"][rows["sequence_ids"] >= 0].tolist() + rows["labels"][rows["loss_mask"]].tolist()
    assert max(int(v) % 1000 - (lengths[int(v) // 1000] - holdout) for v in points) < 0
    if window_mode == "stride":  # and all the rest is trained, once per epoch
        first = {k: v[:units] for k, v in rows.items()}
        assert labelled_transitions(first) == Counter((s, t) for s, n in enumerate(lengths)
                                                      for t in range(n - holdout - 1))
    # Nothing about the tails reaches training: other tail values leave the (normalised) batches unchanged.
    changed = [(d, ds, np.concatenate([v[:-holdout], -v[-holdout:] * 7]) if len(v) > holdout else v * 3)
               for d, ds, v in series]
    a = global_rows(tmp_path / "a", 2 * units, plan_dir=str(tmp_path / "plans"), **cfg)
    b = global_rows(write_corpus(tmp_path / "b", changed), 2 * units, plan_dir=str(tmp_path / "plans"), **cfg)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def reference_pack(lengths_P: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """pack() as main wrote it (commit 99ae16a): one Python step per bin."""
    ascending_P = np.argsort(lengths_P, kind="stable")
    sorted_lengths = lengths_P[ascending_P].tolist()
    ends = np.cumsum(lengths_P[ascending_P]).tolist()
    anchors, fill_from, fill_to = [], [], []
    lo, hi = 0, len(ascending_P)
    while lo < hi:
        hi -= 1
        k = min(bisect_right(ends, (ends[lo - 1] if lo else 0) + capacity - sorted_lengths[hi]), hi)
        anchors.append(hi)
        fill_from.append(lo)
        fill_to.append(k)
        lo = k
    fill_from_B = np.asarray(fill_from, dtype=np.int64)
    fill_B = np.asarray(fill_to, dtype=np.int64) - fill_from_B
    starts_B1 = np.concatenate([[0], np.cumsum(1 + fill_B)])
    order_P = np.empty_like(ascending_P)
    order_P[starts_B1[:-1]] = ascending_P[np.asarray(anchors, dtype=np.int64)]
    order_P[np.repeat(starts_B1[:-1] + 1, fill_B) + np.arange(lo) - np.repeat(fill_from_B, fill_B)] = \
        ascending_P[:lo]
    return order_P, starts_B1


def test_pack_makes_the_bins_of_the_reference_algorithm():
    rng = np.random.default_rng(5)
    cases = [(np.zeros(0, np.int64), 10), (np.array([9]), 10), (np.full(50, 2), 7), (np.full(50, 3), 7)]
    for trial in range(300):
        capacity = int(rng.integers(3, 120))
        n = int(rng.integers(0, 400))
        draw = [rng.integers(2, capacity, n), rng.integers(2, min(capacity, 6), n),
                np.minimum(rng.geometric(0.15, n) + 1, capacity - 1),
                rng.integers(max(2, capacity // 2), capacity, n)][trial % 4]
        cases.append((draw, capacity))
    cases.append((np.clip(rng.lognormal(np.log(600), 1.2, 200_000), 2, 4096).astype(np.int64), 4097))
    for lengths, capacity in cases:
        order, starts = pack(lengths, capacity)
        ref_order, ref_starts = reference_pack(lengths, capacity)
        np.testing.assert_array_equal(order, ref_order)
        np.testing.assert_array_equal(starts, ref_starts)


def test_sequence_moments_are_bit_identical_to_moments():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(1, 200, 3000), [1, 2, 4095, 4096, 4097, 8191, 8192, 8193, 30_000]])
    rng.shuffle(lengths)
    scale = rng.choice([1e-3, 1.0, 1e4, 0.0], len(lengths))
    values = np.concatenate([(rng.gamma(2, 3, n) * s + rng.normal() * 50 * s).astype(np.float32)
                             for n, s in zip(lengths, scale)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    mean, std = sequence_moments(values, offsets)
    expected = np.array([moments(values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    np.testing.assert_array_equal(mean, expected[:, 0])
    np.testing.assert_array_equal(std, expected[:, 1])
    assert (std == 1.0).sum() >= (scale == 0).sum()  # constant series count as std 1


def test_prep_stores_per_sequence_statistics_covered_by_the_manifest(tmp_path):
    make_corpus(tmp_path / "raw")
    out = tmp_path / "prepared"
    prepare(Time300BSource(str(tmp_path / "raw")), out, PrepOptions(workers=1, **QUIET))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    for shard in manifest["shards"]:
        stats = read_stats(out / shard["stats"]["file"])
        rows = read_shard(out / shard["file"]).column("target").to_pylist()
        np.testing.assert_array_equal(stats, [moments(np.asarray(r, np.float32)) for r in rows])
    verify_shards(out)
    stats_file = out / manifest["shards"][1]["stats"]["file"]
    data = bytearray(stats_file.read_bytes())
    data[-3] ^= 0xFF
    stats_file.write_bytes(bytes(data))
    with pytest.raises(PrepError, match=f"{stats_file.name}: sha256 = .* the manifest says"):
        verify_shards(out)
