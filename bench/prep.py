"""Bench: points/s of a full ``timemoe-prep`` run vs writing the same arrays with plain pyarrow (the limit).

Generates a Time-300B-layout corpus (default 200M float32 points, 800 MB: nine domains, .bin files of at most
64M points with sequences straddling them, a third of the datasets with mean/std scales), then measures, in the
same run and from the same warm page cache:

- ``pyarrow``: one process memory-maps the .bin files and writes every sequence as list<float32> into Arrow IPC
  files with plain pyarrow: no validation, cleaning, checksums or fsync;
- ``prep``: ``prepare(Time300BSource(...))`` end to end (index, validate, de-normalise, clean, write, fsync,
  sha256, manifest) with 1 worker (same resources as the baseline) and with ``--workers`` workers.

Prints points/s for each, the ratios, and the hours for Time-300B's 309B points on a 64-core node extrapolated
from the 1-worker (per-core) throughput, assuming storage keeps up.

    python bench/prep.py [--points 200000000] [--workers 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        datasets = generate(root / "in", int(args.points))
        points = sum(int(lengths.sum()) for _, _, lengths in datasets)
        print(f"corpus: {points / 1e6:.1f}M points in {len(datasets)} datasets, generated in "
              f"{time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        assert plain_pyarrow(datasets, root / "plain", (256 << 20) // 4) == points
        base = points / (time.perf_counter() - t)
        print(f"pyarrow (1 process):        {base / 1e6:8.1f} M points/s")
        shutil.rmtree(root / "plain")

        rates = {}
        for workers in sorted({1, args.workers}):
            t = time.perf_counter()
            manifest = prepare(Time300BSource(str(root / "in")), root / "out", PrepOptions(workers=workers,
                                                                                         progress=False))
            rates[workers] = points / (time.perf_counter() - t)
            assert manifest["cleaning"]["input"]["points"] == points
            print(f"prep --workers {workers}:          {rates[workers] / 1e6:8.1f} M points/s "
                  f"({rates[workers] / base:.2f}x pyarrow)")
            shutil.rmtree(root / "out")
        hours = TIME300B_POINTS / (rates[1] * NODE_CORES) / 3600
        print(f"ratio prep/pyarrow, same resources (1 worker): {rates[1] / base:.2f}x (goal >= 0.5x)")
        print(f"extrapolated: 309B points on {NODE_CORES} cores at {rates[1] / 1e6:.1f}M points/s per core "
              f"= {hours:.2f} h (linear scaling, storage keeping up)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
