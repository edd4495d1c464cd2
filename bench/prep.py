"""Bench: points/s of a full ``timemoe-prep`` run vs writing the same arrays with plain pyarrow (the limit).

Generates a Time-300B-layout corpus (default 200M float32 points, 800 MB: nine domains, .bin files of at most
64M points with sequences straddling them, a third of the datasets with mean/std scales), then measures, in the
same run and from the same warm page cache:

- ``pyarrow``: one process memory-maps the .bin files and writes every sequence as list<float32> into Arrow IPC
  files with plain pyarrow: no validation, cleaning, checksums or fsync;
- ``prep``: ``prepare(Time300BSource(...))`` end to end (index, validate, de-normalise, clean, write, fsync,
  sha256, manifest) with 1 worker (same resources as the baseline) and with ``--workers`` workers.

Prints points/s for each, the ratios, and the hours for Time-300B's 309B points on a 64-core node extrapolated
from the 1-worker (per-core) throughput. Worker processes are spawned, which costs about a second per job: the
``--workers`` figure of a job this short understates what workers give on a long one.

    python bench/prep.py [--points 200000000] [--workers 2] [--dir /tmp] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep import PrepOptions, prepare
from data_prep.sources import DOMAINS, Time300BSource

FILE_POINTS = 64 << 20
TIME300B_POINTS = 309e9
NODE_CORES = 64


def generate(root: Path, points: int, seed: int = 0) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """Write the corpus; returns (folder, offsets, lengths) per dataset for the baseline."""
    rng = np.random.default_rng(seed)
    per_dataset = points // (2 * len(DOMAINS))
    datasets = []
    for d, domain in enumerate(DOMAINS):
        for k in range(2):
            folder = root / domain / f"set{k}"
            folder.mkdir(parents=True)
            lengths = rng.integers(512, 12_000, per_dataset // 6000 + 1)
            lengths = lengths[np.cumsum(lengths) <= per_dataset]
            total = int(lengths.sum())
            offsets = np.cumsum(lengths) - lengths
            files = {}
            for i, start in enumerate(range(0, total, FILE_POINTS)):
                n = min(FILE_POINTS, total - start)
                name = f"data-{i}-of-{-(-total // FILE_POINTS)}.bin"
                (rng.standard_normal(n, dtype=np.float32) * 3 + 1).tofile(folder / name)
                files[name] = n
            scaled = (2 * d + k) % 3 == 0
            scales = [
                {"offset": int(o), "length": int(n), **({"mean": 10.0 + i % 7, "std": 2.5} if scaled else {})}
                for i, (o, n) in enumerate(zip(offsets, lengths))
            ]
            meta = {"num_sequences": len(scales), "dtype": "float32", "files": files, "scales": scales}
            (folder / "meta.json").write_text(json.dumps(meta))
            datasets.append((folder, offsets, lengths))
    return datasets


def plain_pyarrow(datasets, out: Path, shard_points: int) -> int:
    """The limit: sequences straight from memory-mapped .bin files into list<float32> IPC files."""
    schema = pa.schema([("target", pa.list_(pa.float32()))])
    out.mkdir()
    written, shard, in_shard = 0, 0, 0
    writer = pa.ipc.new_file(str(out / "0.arrow"), schema)
    for folder, offsets, lengths in datasets:
        meta = json.loads((folder / "meta.json").read_text())
        stream = np.concatenate([np.memmap(folder / f, np.float32, "r") for f in sorted(meta["files"])])
        for a in range(0, len(lengths), 512):
            lens = lengths[a : a + 512]
            values = stream[offsets[a] : offsets[a] + lens.sum()]
            offs = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
            writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offs, values)], schema=schema))
            written += int(lens.sum())
            in_shard += int(lens.sum())
            if in_shard >= shard_points:
                writer.close()
                shard, in_shard = shard + 1, 0
                writer = pa.ipc.new_file(str(out / f"{shard}.arrow"), schema)
    writer.close()
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=float, default=200e6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        datasets = generate(root / "in", int(args.points))
        points = sum(int(lengths.sum()) for _, _, lengths in datasets)
        print(f"corpus: {points / 1e6:.1f}M points in {len(datasets)} datasets, generated in "
              f"{time.perf_counter() - t:.1f}s")

        def best_rate(run) -> tuple[float, float]:
            """Points per wall second and per CPU second (this process plus its workers), best of --repeat runs.

            The machine may be shared: other load stretches wall time but hardly CPU time, so points per CPU
            second is the per-core throughput, and the figure the extrapolation uses.
            """
            wall, cpu = [], []
            for _ in range(args.repeat):
                t, c = time.perf_counter(), sum(os.times()[:4])
                run()
                wall.append(time.perf_counter() - t)
                cpu.append(sum(os.times()[:4]) - c)
                shutil.rmtree(root / "out")
            return points / min(wall), points / min(cpu)

        def baseline() -> None:
            assert plain_pyarrow(datasets, root / "out", (256 << 20) // 4) == points

        def prep(workers: int) -> None:
            manifest = prepare(Time300BSource(str(root / "in")), root / "out",
                               PrepOptions(workers=workers, progress=False))
            assert manifest["cleaning"]["input"]["points"] == points

        row = "{:<22} {:>10.1f} M points/s wall {:>10.1f} M points/CPU-s"
        base_wall, base_cpu = best_rate(baseline)
        print(row.format("pyarrow (1 process)", base_wall / 1e6, base_cpu / 1e6))
        rates = {}
        for workers in sorted({1, args.workers}):
            rates[workers] = best_rate(lambda: prep(workers))
            print(row.format(f"prep --workers {workers}", rates[workers][0] / 1e6, rates[workers][1] / 1e6))
        per_core = rates[1][1]
        print(f"ratio prep/pyarrow, 1 process each: {per_core / base_cpu:.2f}x per CPU second, "
              f"{rates[1][0] / base_wall:.2f}x wall (goal >= 0.5x)")
        if args.workers > 1:
            print(f"ratio prep --workers {args.workers} / pyarrow (1 process), wall: "
                  f"{rates[args.workers][0] / base_wall:.2f}x")
        hours = TIME300B_POINTS / (per_core * NODE_CORES) / 3600
        print(f"extrapolated: 309B points / ({NODE_CORES} cores x {per_core / 1e6:.1f}M points/s per core) "
              f"= {hours:.3f} h ({hours * 60:.1f} min) of compute; it writes {TIME300B_POINTS * 4 / 1e12:.2f} TB, "
              f"so storage sets the pace unless it sustains {TIME300B_POINTS * 4 / (hours * 3600) / 1e9:.0f} GB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
