"""Launching the trainer test worker (tests/dist/train_run.py) under torchrun, and reading what a run wrote; a small
corpus packed by the real `timemoe-prep`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "dist" / "train_run.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")

# Tiny model, short windows, a clipping threshold every step exceeds (so clipping is part of every comparison).
TINY = ["model=tiny", "data=synthetic", "data.max_length=48", "logger=none", "logger.progress=false",
        "trainer.max_steps=6", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "optim.lr=1e-3",
        "optim.warmup_steps=2", "optim.clip_grad=0.05", "checkpoint.interval=3", "logger.heatmap_interval=3"]


def worker_env(**extra) -> dict:
    # A launched job gets its distributed variables from its launcher, never from this process (an in-process
    # trainer test sets LOCAL_RANK here, and submitit refuses to export over it).
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(DS_BUILD_OPS="0", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", **extra)
    return env


def torchrun_command(nproc: int, run_dir: Path, overrides: list[str], *options: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(WORKER), "--run-dir", str(run_dir),
            *options, "--", f"checkpoint.dir={run_dir / 'checkpoints'}", *overrides]


def launch(nproc: int, run_dir: Path, overrides: list[str], *options: str, env: dict | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_command(nproc, run_dir, overrides, *options), env=env or worker_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc


def launch_ok(nproc: int, run_dir: Path, overrides: list[str], *options: str, **kw) -> Path:
    proc = launch(nproc, run_dir, overrides, *options, **kw)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cycles_corpus(folder: Path, points: int, channels: int) -> dict[str, np.ndarray]:
    """folder/cycles.csv, seeded hourly daily cycles with noise (ETTh1 itself is what the leakage guard keeps out of
    every corpus), packed by `timemoe-prep` into folder/prepared as one energy dataset; returns the channels."""
    rng = np.random.default_rng(0)
    t = np.arange(points)
    series = {f"c{i}": np.sin(2 * np.pi * t / 24 + i) * (i + 1) + np.cumsum(rng.normal(0, 0.1, t.size))
              for i in range(channels)}
    pd.DataFrame({"date": pd.date_range("2016-07-01", periods=t.size, freq="h").astype(str), **series}).to_csv(
        folder / "cycles.csv", index=False)
    proc = subprocess.run([str(TORCHRUN.with_name("timemoe-prep")), "--source", "csv", "--input", "cycles.csv",
                           "--output", "prepared", "--domain", "energy", "--workers", "1", "--no-progress"], cwd=folder,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return series
