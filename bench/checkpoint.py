"""What a save costs each rank of `timemoe-train`, at 1, 2 and 4 processes (CPU, gloo, fp32, ZeRO-1, EP=1, the same
model), all in one run. In each launch every rank trains 2 steps, then saves the same step three times: a warm-up,
a synchronous save (checkpoint.async_save=false) and an asynchronous one (the default), and reports
- extra memory:  the peak resident memory while the async save runs, until it is in place (the kernel's high-water
                 mark, reset through /proc/self/clear_refs), less the resident memory just before it. Run with
                 glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident
                 set and a save cannot hide in memory a freed activation left behind
- (staging):     the same, until `save` returned (the copy to host memory)
- staged:        the bytes of the tensors the async save holds in host memory for the background write
- written:       the bytes this rank wrote into the checkpoint (DeepSpeed's files, its elastic share, its trainer
                 state), against the elastic state of the whole model (fp32 weights + 2 Adam moments)
- stall:         how long `save` held the step loop: the async save (until its share is copied to host memory)
                 as a ratio to the synchronous one (until the checkpoint is in place)
The last line gives, per process count, the rank needing most: the larger of its extra memory and its staged bytes.
The machine is shared: read the times as a rough guide.

    python bench/checkpoint.py [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_step import device_line  # noqa: E402

PROCESSES = (1, 2, 4)
MODES = ("warm-up", "sync", "async")


def _status(key: str) -> int:
    """A memory figure of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def _tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages in a nested structure of dicts, lists and tuples."""
    seen, stack, total = set(), [obj], 0
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


class RssSampler:
    """The highest resident set size seen by a thread reading it every half millisecond (a cross-check of the
    kernel's high-water mark)."""

    def __init__(self):
        import threading

        self.peak, self._stop = _status("VmRSS"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.0005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def worker(args) -> None:
    """One rank of a launch: train, then time and measure the three saves; prints its figures as one JSON line."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    overrides = ["model=tiny", f"model.hidden_size={args.hidden}", f"model.intermediate_size={4 * args.hidden}",
                 f"model.num_hidden_layers={args.layers}", "model.num_attention_heads=8", "data=synthetic",
                 "data.max_length=64", "logger=none", "logger.progress=false", "trainer.max_steps=2",
                 "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "parallel.zero_stage=1",
                 "checkpoint.interval=0", "checkpoint.save_at_end=false", "logger.heatmap_interval=0",
                 f"checkpoint.dir={args.workdir / 'checkpoints'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        trainer = make_trainer(compose("train", overrides=overrides), args.workdir / "run")
    trainer.fit()
    checkpointer, written = trainer.checkpointer, {}
    write = checkpointer._write

    def counted(tmp_dir, tag, files, records, entries, *rest):
        written["staged"] = _tensor_bytes([[obj for _, obj in files],
                                           [list(chunks.boxes.values()) for chunks in (entries or {}).values()]])
        write(tmp_dir, tag, files, records, entries, *rest)
        written["bytes"] = sum(size for size, _ in records.values())

    checkpointer._write = counted
    parameters = sum(p.numel() for p in trainer.module.parameters())
    figures = {"rank": dist.get_rank(), "parameters": parameters, "state_bytes": 12 * parameters}
    for mode in MODES:
        trainer.run.checkpoint.async_save = mode == "async"
        gc.collect()
        dist.barrier()
        before = _status("VmRSS")
        _reset_peak()
        sampler = RssSampler()
        start = time.perf_counter()
        trainer.save()
        stall = time.perf_counter() - start
        staging_peak = max(_status("VmHWM"), sampler.peak) - before
        checkpointer.wait()
        sampled = sampler.stop()
        figures[mode] = {"stall_s": stall, "total_s": time.perf_counter() - start,
                         "extra_bytes": max(_status("VmHWM"), sampled) - before, "written_bytes": written["bytes"],
                         "staged_bytes": written["staged"], "staging_peak_bytes": staging_peak}
    trainer.close()
    # One write of the whole line (atomic on a pipe under PIPE_BUF bytes): the ranks share the launcher's stdout, and
    # print's separate write of the newline let another rank's line land in the middle.
    sys.stdout.write(f"FIGURES {json.dumps(figures)}\n")
    sys.stdout.flush()


def launch(nproc: int, args, workdir: Path) -> list[dict]:
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 16),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", __file__, "--worker",
                           "--workdir", str(workdir), "--hidden", str(args.hidden), "--layers", str(args.layers)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    lines = [json.loads(x[len("FIGURES "):]) for x in proc.stdout.splitlines() if x.startswith("FIGURES ")]
    if proc.returncode or len(lines) != nproc:
        sys.exit(f"{nproc} processes failed:\n{proc.stderr[-4000:]}")
    return sorted(lines, key=lambda f: f["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"device: {device_line()}")
    runs = {}
    for nproc in PROCESSES:
        with tempfile.TemporaryDirectory() as tmp:
            runs[nproc] = launch(nproc, args, Path(tmp))
    first = runs[1][0]
    state = first["state_bytes"]
    print(f"model: {first['parameters']:,} parameters (tiny, hidden {args.hidden}, {args.layers} layers), fp32, "
          f"ZeRO-1, EP=1; elastic state (weights + 2 Adam moments) {state / 2**20:.0f} MiB")
    print(f"{'processes':>9} {'rank':>4} {'extra memory':>13} {'(staging)':>10} {'staged':>10} {'written':>10} "
          f"{'of state':>8} {'sync save':>10} {'async stall':>12} {'async total':>12}")
    for nproc, ranks in runs.items():
        for f in ranks:
            a, s = f["async"], f["sync"]
            print(f"{nproc:>9} {f['rank']:>4} {a['extra_bytes'] / 2**30:>10.3f} GB "
                  f"{a['staging_peak_bytes'] / 2**30:>7.3f} GB "
                  f"{a['staged_bytes'] / 2**20:>6.1f} MiB {a['written_bytes'] / 2**20:>6.1f} MiB "
                  f"{a['written_bytes'] / state:>8.2f} {s['total_s']:>8.2f} s {a['stall_s']:>10.2f} s "
                  f"{a['total_s']:>10.2f} s")
    # Per rank the larger of the measured peak and the bytes staged (the kernel may lend a save pages freed just
    # before it); the last line gives the rank that needs most.
    peak = {n: max(max(f["async"]["extra_bytes"], f["async"]["staged_bytes"]) for f in ranks) / 2**30
            for n, ranks in runs.items()}
    stall = {n: max(f["async"]["stall_s"] for f in ranks) / max(f["sync"]["total_s"] for f in ranks)
             for n, ranks in runs.items()}
    print("stall of an async save / a synchronous save (slowest rank): "
          + ", ".join(f"{n} processes {x:.2f}x" for n, x in stall.items()))
    print(f"device (end): {device_line()}")
    print(f"save memory per rank: 1 process {peak[1]:.3f} GB, 2 processes {peak[2]:.3f} GB, "
          f"4 processes {peak[4]:.3f} GB; stall {stall[1]:.2f}x a synchronous save")


if __name__ == "__main__":
    main()
