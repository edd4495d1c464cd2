"""The data plane at cluster scale: plan build (once), start-up and memory per rank, windows/s per worker.

For corpora of 1M, 10M and 50M sequences with a Time-300B-like length mix, in one run on this machine:
- build:  one process builds the sample plan (index, windows, packing bins, statistics) into its cache file
- ranks:  8 processes (8 ranks on one node) start at once, each maps the same plan and makes its first batch;
          start = from build_train_loader() to the first batch (interpreter and torch imports excluded),
          rss = that process's peak resident set (VmHWM: its private memory plus the pages of the shared memory maps
          it touched), anon = its private part alone
- worker: batches per second one process makes on its own (num_workers=0: a loader worker's work)
Goal at 50M: build <= 120 s, rank start <= 10 s, rss <= 1 GB per rank, growing linearly.

Simulated so that 50M sequences fit this disk: Time-300B's lengths (48M sequences, 309B points, nature ≈ 90% of the
points; lognormal per domain, made up to match those totals) are divided by --scale (256: at least 2 points each)
and max_length is 4096/scale, so each sequence yields as many windows and packing pieces as at full length and the
plan has the size it would have for Time-300B; the shards hold real float32 series and timemoe-prep's statistics
files. What the scale changes is the points per window: windows/s here are 17-point windows (bench/loader.py
measures 4097-point ones).

    python bench/loader_scale.py [--sizes 1M,10M,50M] [--scale 256] [--ranks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOMAINS = {  # domain -> (share of sequences, median length, lognormal sigma) at full scale
    "nature": (0.10, 30_000, 1.1), "energy": (0.12, 400, 1.3), "finance": (0.10, 300, 1.3),
    "healthcare": (0.08, 300, 1.3), "other": (0.08, 300, 1.3), "sales": (0.20, 200, 1.2),
    "synthetic": (0.07, 1000, 1.0), "transport": (0.12, 400, 1.3), "web": (0.13, 300, 1.3)}
SHARD_POINTS, BATCH_POINTS = 64 << 20, 4 << 20


def _strings(parts_NK: np.ndarray):
    """A string array of fixed-width byte rows, built without Python objects per row."""
    import pyarrow as pa
    n, k = parts_NK.shape
    offsets = np.arange(n + 1, dtype=np.int32) * k
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(parts_NK)))


def _constant(text: str, n: int):
    return _strings(np.tile(np.frombuffer(text.encode(), np.uint8), (n, 1)))


def write_corpus(out: Path, sequences: int, scale: int, rng: np.random.Generator) -> tuple[int, float]:
    """Shards, statistics files and manifest as timemoe-prep writes them; returns (points, seconds)."""
    import pyarrow as pa

    from data_prep.clean import new_counts
    from data_prep.index import IndexedDataset
    from data_prep.corpus_manifest import build_manifest, write_manifest
    from data_prep.moments import sequence_moments
    from data_prep.shards import SCHEMA, ShardWriter, shard_name, stats_name, write_stats

    start = time.perf_counter()
    out.mkdir(parents=True)
    lengths, keys = [], []
    for domain, (share, median, sigma) in DOMAINS.items():
        for d in range(2):
            n = int(round(sequences * share / 2))
            full = rng.lognormal(np.log(median), sigma, n)
            lengths.append(np.maximum(2, np.round(full / scale)).astype(np.int64))
            keys.append((domain, f"{domain}{d}"))
    lengths[-1] = lengths[-1][:len(lengths[-1]) - (sum(map(len, lengths)) - sequences)]
    points = int(sum(x.sum() for x in lengths))
    # Shards hold consecutive sequences; a record batch holds at most BATCH_POINTS points of one dataset.
    cuts = []  # (dataset, first, last)
    for k, length in enumerate(lengths):
        cum = np.cumsum(length)
        edges = np.searchsorted(cum, np.arange(BATCH_POINTS, cum[-1] + BATCH_POINTS, BATCH_POINTS), side="right")
        edges = np.unique(np.concatenate([[0], np.minimum(edges, len(length))]))
        cuts += [(k, a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    batch_points = np.array([lengths[k][a:b].sum() for k, a, b in cuts])
    shard_of = np.cumsum(batch_points) // SHARD_POINTS
    count = int(shard_of[-1]) + 1
    shards = []
    for s in range(count):
        name = shard_name(s, count)
        writer, per_dataset, means, stds, rows, pts = ShardWriter(out / name), {}, [], [], 0, 0
        for i in np.flatnonzero(shard_of == s):
            k, a, b = cuts[i]
            length = lengths[k][a:b]
            n = int(b - a)
            offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
            values = rng.standard_normal(int(offsets[-1]), dtype=np.float32)
            ids = (np.arange(a, b)[:, None] // 10 ** np.arange(9)[::-1] % 10 + 48).astype(np.uint8)
            domain, dataset = keys[k]
            target = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            writer.write(pa.RecordBatch.from_arrays(
                [_strings(ids), _constant(domain, n), _constant(dataset, n), pa.nulls(n, pa.string()), target],
                schema=SCHEMA))
            mean, std = sequence_moments(values, offsets)
            means.append(mean)
            stds.append(std)
            entry = per_dataset.setdefault(f"{domain}/{dataset}", {"sequences": 0, "points": 0,
                                                                     "cleaning": new_counts()})
            entry["sequences"] += n
            entry["points"] += int(offsets[-1])
            rows += n
            pts += int(offsets[-1])
        size, digest = writer.commit()
        st_size, st_digest = write_stats(out / stats_name(name), np.concatenate(means), np.concatenate(stds))
        shards.append({"file": name, "rows": rows, "points": pts, "bytes": size, "sha256": digest,
                       "datasets": per_dataset,
                       "stats": {"file": stats_name(name), "bytes": st_size, "sha256": st_digest}})
    datasets = [IndexedDataset(d, ds, None, (), "", int(len(x)), int(x.sum()), False, False)
                for (d, ds), x in zip(keys, lengths)]
    write_manifest(out, build_manifest({}, datasets, shards, [], []))
    return points, time.perf_counter() - start


def memory() -> dict[str, float]:
    """Peak RSS, its private (anonymous) part, and PSS: the shared pages divided among the processes mapping them."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    gb = lambda table, key: int(table[key].split()[0]) / 2**20  # noqa: E731 - kB -> GB
    return {"peak_rss_gb": gb(status, "VmHWM"), "anon_gb": gb(status, "RssAnon"), "file_gb": gb(status, "RssFile"),
            "pss_gb": gb(rollup, "Pss")}


def child(mode: str, corpus: str, plans: str, scale: int, rank: int, ranks: int, go: str, seconds: float) -> None:
    import logging

    from timemoe_train.data import DataConfig, build_train_loader
    logging.basicConfig(level=logging.WARNING)
    cfg = DataConfig(path=corpus, plan_dir=plans, max_length=4096 // scale, num_workers=0)
    micro = 8
    if go:
        Path(f"{go}.ready{rank}").touch()
        while not os.path.exists(go):
            time.sleep(0.005)
    start = time.perf_counter()
    loader = build_train_loader(cfg, rank, ranks, ranks * micro * 4, micro)
    it = iter(loader)
    next(it)
    result = {"start_s": time.perf_counter() - start}
    if mode == "rank":
        result |= memory()  # after the start, and again after making batches for a while
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["inputs"].shape[0]
    result |= {"windows_per_s": n / (time.perf_counter() - t0)} | {f"end_{k}": v for k, v in memory().items()}
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {out}")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])


def run_size(size: int, scale: int, ranks: int, root: Path, rng) -> dict:
    corpus, plans, go = root / "corpus", root / "plans", root / "go"
    points, written = write_corpus(corpus, size, scale, rng)
    disk = sum(p.stat().st_size for p in corpus.iterdir()) / 2**30
    print(f"{size / 1e6:g}M sequences: corpus of {points / 1e9:.2f} G points, {disk:.1f} GiB written in "
          f"{written:.0f} s (with prep-time statistics)", flush=True)
    build = result(spawn(["build", str(corpus), str(plans), str(scale), "0", "1", "", "0"]))
    plan_gb = sum(p.stat().st_size for p in plans.glob("plan-*.bin")) / 2**30
    procs = [spawn(["rank", str(corpus), str(plans), str(scale), str(r), str(ranks), str(go), "3"])
             for r in range(ranks)]
    while len(list(root.glob("go.ready*"))) < ranks:
        time.sleep(0.05)
    go.touch()
    per_rank = [result(p) for p in procs]
    alone = result(spawn(["worker", str(corpus), str(plans), str(scale), "0", "1", "", "5"]))
    row = {"sequences": size, "points": points, "build_s": build["start_s"], "plan_gb": plan_gb,
           "build_peak_rss_gb": build["end_peak_rss_gb"],
           "rank_start_s": max(r["start_s"] for r in per_rank),
           "rank_rss_gb": max(max(r["peak_rss_gb"], r["end_peak_rss_gb"]) for r in per_rank),
           "rank_anon_gb": max(max(r["anon_gb"], r["end_anon_gb"]) for r in per_rank),
           "worker_windows_s": alone["windows_per_s"]}
    print(f"  build {row['build_s']:.1f} s (plan file {plan_gb:.2f} GiB, builder peak RSS "
          f"{row['build_peak_rss_gb']:.2f} GB); {ranks} ranks at once: start {row['rank_start_s']:.2f} s, peak RSS "
          f"{row['rank_rss_gb']:.3f} GB/rank (private {row['rank_anon_gb']:.3f} GB); one worker "
          f"{row['worker_windows_s']:,.0f} windows/s of {4096 // scale + 1} points", flush=True)
    shutil.rmtree(corpus)
    shutil.rmtree(plans)
    for p in root.glob("go*"):
        p.unlink()
    return row


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, corpus, plans, scale, rank, ranks, go, seconds = sys.argv[2:]
        return child(mode, corpus, plans, int(scale), int(rank), int(ranks), go, float(seconds))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,10M,50M")
    p.add_argument("--scale", type=int, default=256)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--dir", default=None, help="where the corpora are written (default: a temporary directory)")
    args = p.parse_args()
    sizes = [int(float(s.rstrip("M")) * 1e6) for s in args.sizes.split(",")]
    print(f"Time-300B-like corpora, lengths / {args.scale}, max_length {4096 // args.scale}; {os.cpu_count()} CPUs",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in sizes:
            rows.append(run_size(size, args.scale, args.ranks, Path(tmp), np.random.default_rng(size)))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        ratio = b["sequences"] / a["sequences"]
        print(f"growth {a['sequences'] / 1e6:g}M -> {b['sequences'] / 1e6:g}M ({ratio:.0f}x sequences): build "
              f"{b['build_s'] / a['build_s']:.1f}x, rank start {b['rank_start_s'] / a['rank_start_s']:.1f}x, "
              f"private memory {b['rank_anon_gb'] / a['rank_anon_gb']:.1f}x")
    last = rows[-1]
    print(f"{last['sequences'] / 1e6:g}M sequences: build {last['build_s']:.1f} s, rank start "
          f"{last['rank_start_s']:.2f} s, rss {last['rank_rss_gb']:.2f} GB/rank")


if __name__ == "__main__":
    main()
