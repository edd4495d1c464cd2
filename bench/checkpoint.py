"""Checkpoint cost of `timemoe-train` against a training step, at one model size (default base, fp32, CPU, one
process, ZeRO-1), all in one run:
- step:          the median training step (after the first) of the run that writes the checkpoint
- save:          the whole save, and its parts: DeepSpeed's own files (fast path), the elastic part (full fp32
                 weights + Adam moments gathered through DeepSpeed's accessors, then written by DCP),
                 the manifest (the digests are computed while writing; files written past the digest are hashed here)
- verified load: (a fresh process each) the newest checkpoint verified against its manifest (every byte hashed), then loaded by the same
                 layout (DeepSpeed's own files) and by another one (ZeRO-2: the elastic part)
Ratios are to the training step. The machine is shared: read them as a rough guide.

    python bench/checkpoint.py [--size base] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_step import MAX_LENGTH, SIZES, device_line  # noqa: E402


@contextmanager
def timed(owner, name: str, times: dict, key: str):
    """Time every call of `owner.name` into times[key] while inside."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def trainer_for(size: str, steps: int, run_dir: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    s = SIZES[size]
    overrides = [f"model={size}", "data=synthetic", f"data.max_length={MAX_LENGTH}", "logger=none",
                 "logger.progress=false", f"trainer.max_steps={steps}", f"trainer.global_batch_size={s['global']}",
                 f"trainer.micro_batch_size={s['micro']}", "checkpoint.interval=0", "logger.heatmap_interval=0",
                 f"checkpoint.dir={run_dir.parent / 'checkpoints'}", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return make_trainer(compose("train", overrides=overrides), run_dir)


def phase(name: str, size: str, steps: int, workdir: Path) -> dict:
    """One trainer per process (DeepSpeed keeps its process groups per process): `write` trains and saves,
    `same layout` / `elastic` resume from that checkpoint. Returns its times."""
    from timemoe_train.checkpoint import elastic, resume
    from timemoe_train.train import checkpoint as train_checkpoint
    from timemoe_train.train.checkpointer import Checkpointer

    times: dict[str, float] = {}
    if name == "write":
        writer = trainer_for(size, steps, workdir / "write")
        times["parameters"] = sum(p.numel() for p in writer.module.parameters())
        with timed(Checkpointer, "save", times, "save"), timed(writer.engine, "save_checkpoint", times, "deepspeed"), \
                timed(train_checkpoint, "engine_state", times, "gather"), timed(elastic, "save", times, "elastic"), \
                timed(train_checkpoint, "write_manifest", times, "manifest"):
            writer.fit()  # saves at the end
        records = [json.loads(line) for line in (workdir / "write" / "metrics.jsonl").read_text().splitlines()]
        times["step"] = statistics.median(r["step_time_s"] for r in records[1:] or records)
        writer.close()
        return times
    with timed(resume, "resume_point", times, "verify"), timed(Checkpointer, "load", times, "load"):
        reader = trainer_for(size, steps, workdir / name.replace(" ", "_"),
                             *(("parallel.zero_stage=2",) if name == "elastic" else ()))
    assert reader.step == steps, reader.step
    reader.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print("PHASE " + json.dumps(phase(args.phase, args.size, args.steps, args.workdir)))
        return
    env = {**os.environ, "DS_BUILD_OPS": "0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    print(f"device: {device_line()}")
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("write", "same layout", "elastic"):
            proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                                   "--phase", name, "--workdir", tmp], capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASE ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
            times[name] = json.loads(line[len("PHASE "):])
        size = sum(p.stat().st_size for p in (Path(tmp) / "checkpoints").rglob("*") if p.is_file())
    w, step = times["write"], times["write"]["step"]
    print(f"{args.size}: {w['parameters']:,.0f} parameters, checkpoint {size / 2**20:.0f} MiB on disk, fp32, "
          f"1 process, ZeRO-1; training step: global batch {SIZES[args.size]['global']} x {MAX_LENGTH} points")
    rows = [("training step (median)", step), ("save", w["save"]), ("  DeepSpeed's files", w["deepspeed"]),
            ("  elastic: gather full fp32 state", w["gather"]), ("  elastic: DCP write", w["elastic"]),
            ("  manifest", w["manifest"])]
    for name in ("same layout", "elastic"):
        r = times[name]
        rows += [(f"verified load, {name}", r["verify"] + r["load"]), ("  verify (sha256 of every file)", r["verify"]),
                 ("  load", r["load"])]
    for name, seconds in rows:
        print(f"  {name:32s} {seconds:8.2f} s   x{seconds / step:5.2f} of a step")
    print(f"device (end): {device_line()}")


if __name__ == "__main__":
    main()
