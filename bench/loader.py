"""Training-data throughput: windows/s the loader delivers vs windows/s a training step consumes.

Measured in one run on the same machine:
- loader:   `build_train_loader` over shards that `timemoe-prep` made from a generated Time-300B-layout corpus
            (packed 4097-point windows, sequence z-normalisation, worker processes with prefetch)
- released: the released code's access pattern over the same raw `.bin` files: per window, open the file(s),
            seek, read the whole sequence, de-normalise, z-normalise, cut the window, pad (same workers, batch)
- training: one fwd+bwd+AdamW step of `TimeMoeConfig.preset("base")` on a loader micro-batch of 1 x 4096
- GPU:      what one H100 consumes at 40% MFU (989 TFLOP/s dense bf16, an assumption, not a measurement) for the
            base and large presets: points/s = 0.4 x 989e12 / FLOPs per point, the FLOPs of
            timemoe_train.train.metrics.train_flops on the loader's own rows (6 x active weights per point plus
            attention over each packed sequence); headroom per loader worker = a worker's points/s over that
Goal: loader >= 20x what training consumes. The last line is `headroom: <loader / training>x`.

    python bench/loader.py [--points 6000000] [--workers 2] [--batch 8] [--batches 150] [--train-steps 2]
                           [--train-preset base]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_prep.pipeline import PrepOptions, prepare
from data_prep.sources.time300b import Time300BSource
from timemoe_train.data import DataConfig, build_train_loader
from timemoe_train.model.config import TimeMoeConfig
from timemoe_train.model.modeling import TimeMoeForPrediction
from timemoe_train.train.metrics import segment_square_sum, train_flops

MAX_LENGTH = 4096
H100_BF16_DENSE, MFU = 989e12, 0.40
DOMAINS = {  # domain -> median series length: short, medium and long series, as in Time-300B
    "energy": 600, "nature": 20_000, "web": 3_000}


def write_time300b(root: Path, total_points: int, rng: np.random.Generator) -> None:
    """<domain>/<dataset>/meta.json + data-{i}-of-{n}.bin, stored normalised with per-series mean/std, series
    straddling file boundaries."""
    for domain, median in DOMAINS.items():
        for d in range(2):
            lengths = np.clip(rng.lognormal(np.log(median), 1.0, 10 * total_points // median), 16, 200_000)
            lengths = lengths[np.cumsum(lengths) <= total_points // (2 * len(DOMAINS))].astype(np.int64)
            values = np.cumsum(rng.normal(size=int(lengths.sum())), dtype=np.float64).astype(np.float32)
            folder = root / domain / f"{domain}{d}"
            folder.mkdir(parents=True)
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            scales = [{"offset": int(o), "length": int(n), "mean": 1.5, "std": 2.0} for o, n in zip(offsets, lengths)]
            files = {}
            for i, part in enumerate(np.array_split(values, 3)):
                name = f"data-{i}-of-3.bin"
                part.astype("<f4").tofile(folder / name)
                files[name] = len(part)
            (folder / "meta.json").write_text(json.dumps(
                {"num_sequences": len(lengths), "dtype": "float32", "files": files, "scales": scales}))


class ReleasedStyleWindows(Dataset):
    """Windows of every .bin dataset under root, read the way the released code reads them: per sample."""

    def __init__(self, root: Path):
        self.windows = []  # (files [(path, first point, points)], offset, length, mean, std, window offset)
        for meta_path in sorted(root.glob("*/*/meta.json")):
            meta = json.loads(meta_path.read_text())
            files, start = [], 0
            for name, points in sorted(meta["files"].items(), key=lambda kv: int(kv[0].split("-")[1])):
                files.append((meta_path.parent / name, start, points))
                start += points
            for s in meta["scales"]:
                seq = (files, s["offset"], s["length"], s["mean"], s["std"])
                self.windows.append((*seq, 0))
                self.windows += [(*seq, o) for o in range(MAX_LENGTH, s["length"] - MAX_LENGTH, MAX_LENGTH)]

    def __len__(self):
        return len(self.windows)

    @staticmethod
    def read(files, offset: int, length: int) -> np.ndarray:
        parts = []
        for path, first, points in files:
            lo, hi = max(offset, first), min(offset + length, first + points)
            if lo < hi:
                part = np.empty(hi - lo, dtype=np.float32)
                with open(path, "rb", buffering=0) as f:
                    f.seek((lo - first) * 4)
                    f.readinto(part)
                parts.append(part)
        return np.concatenate(parts)

    def __getitem__(self, i):
        files, offset, length, mean, std, window = self.windows[i]
        seq = self.read(files, offset, length) * std + mean
        seq = ((seq - seq.mean(dtype=np.float64)) / (seq.std(dtype=np.float64) or 1.0)).astype(np.float32)
        seq = seq[window:window + MAX_LENGTH + 1]
        mask = np.ones(len(seq) - 1, dtype=np.int32)
        pad = MAX_LENGTH + 1 - len(seq)
        seq, mask = np.pad(seq, (0, pad)), np.pad(mask, (0, pad))
        return {"input_ids": seq[:-1], "labels": seq[1:], "loss_masks": mask}


def rate(batches, n_batches: int, warmup: int = 5, shape: dict | None = None) -> tuple[float, float]:
    """(windows/s, labelled points/s) once the workers are running; `shape` collects the points and Σ length² of
    the rows (what the FLOP count needs)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    windows = points = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
        mask = batch["loss_mask"] if "loss_mask" in batch else batch["loss_masks"]
        windows += mask.shape[0]
        points += int(mask.sum())
        if shape is not None:
            shape["points"] = shape.get("points", 0) + int((batch["sequence_ids"] >= 0).sum())
            shape["square_sum"] = shape.get("square_sum", 0.0) + float(segment_square_sum(batch["sequence_ids"]))
    seconds = time.perf_counter() - start
    return windows / seconds, points / seconds


def train_rate(batch: dict[str, torch.Tensor], steps: int, preset: str) -> float:
    torch.manual_seed(0)
    model = TimeMoeForPrediction(TimeMoeConfig.preset(preset)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(batch["inputs"], batch["labels"], batch["loss_mask"], batch["sequence_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["inputs"].shape[0] / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=6_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--train-preset", default="base", help="model of the CPU training step (tiny: a quick run)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = Path(tmp) / "time300b", Path(tmp) / "prepared"
        write_time300b(raw, args.points, np.random.default_rng(0))
        prepare(Time300BSource(str(raw)), prepared, PrepOptions(workers=args.workers, progress=False))

        start = time.perf_counter()
        cfg = DataConfig(path=str(prepared), max_length=MAX_LENGTH, num_workers=args.workers)
        loader = build_train_loader(cfg, global_batch_size=args.batch, micro_batch_size=args.batch)
        setup = time.perf_counter() - start
        shape = {}
        ours, ours_points = rate(loader, args.batches, shape=shape)

        released = DataLoader(ReleasedStyleWindows(raw), batch_size=args.batch, shuffle=True,
                              num_workers=args.workers, prefetch_factor=cfg.prefetch_factor,
                              generator=torch.Generator().manual_seed(0))
        theirs, theirs_points = rate(released, args.batches)

        one_row = build_train_loader(DataConfig(path=str(prepared), max_length=MAX_LENGTH, num_workers=0))
        trained = train_rate(next(iter(one_row)), args.train_steps, args.train_preset)

    print(f"corpus: {args.points:,} points in {len(DOMAINS) * 2} Time-300B datasets; {args.workers} workers, "
          f"batches of {args.batch} x {MAX_LENGTH}; torch threads {torch.get_num_threads()}")
    print(f"loader setup (index, packing plan): {setup:.2f} s")
    print(f"loader:   {ours:10.1f} windows/s  {ours_points / 1e6:8.2f} M labelled points/s")
    print(f"released: {theirs:10.1f} windows/s  {theirs_points / 1e6:8.2f} M labelled points/s  "
          f"(loader is {ours / theirs:.1f}x in windows, {ours_points / theirs_points:.1f}x in points)")
    print(f"training: {trained:10.4f} windows/s  ({args.train_preset} preset, fwd+bwd+AdamW, 1 x {MAX_LENGTH})")
    # The loader's points: every real point of a row (what the trainer counts for MFU), per worker.
    worker_points = shape["points"] / args.batches / args.batch * ours / max(args.workers, 1)
    print(f"GPU assumption: one H100 at {MFU:.0%} MFU of {H100_BF16_DENSE / 1e12:.0f} TFLOP/s dense bf16 "
          f"(not measured); FLOPs from train_flops on the loader's rows")
    for preset in ("base", "large"):
        c = TimeMoeConfig.preset(preset)
        per_point = train_flops(c, shape["points"], shape["square_sum"]) / shape["points"]
        gpu_points = MFU * H100_BF16_DENSE / per_point
        print(f"H100 {preset:>5}: {per_point / 1e6:8.1f} MFLOP/point -> {gpu_points / 1e6:6.2f} M points/s; one loader "
              f"worker {worker_points / 1e6:.2f} M points/s = {worker_points / gpu_points:.2f}x, "
              f"{args.workers} workers {args.workers * worker_points / gpu_points:.2f}x "
              f"(workers needed per GPU: {gpu_points / worker_points:.1f})")
    print(f"headroom: {ours / trained:.0f}x")


if __name__ == "__main__":
    main()
