"""Training throughput (time points/s) and MFU of `timemoe-train`, side by side with a plain training step of the
reference model (the released code's scheme: HF model with a per-expert mask loop, one process).

Runs, per model size, on the same synthetic packed windows (fp32, CPU), the same optimizer implementation
(torch's fused AdamW, as our engine uses):
- reference:   1 process, the exported remote-code model, forward/backward/AdamW by hand (gradient accumulation)
- ours 1p:     the timemoe-train Trainer in this process (EP=1), attention as `model.attn_impl=auto` picks
- ours 1p compile: the same with `model.compile=true` (per-block torch.compile)
- ours 2p:     timemoe-train on 2 processes (torchrun), EP=1 (data parallel)
- ours 2p EP2: timemoe-train on 2 processes, experts split in two (megatron alltoall dispatch)
The reference and the in-process runs get the global batches built before their timers start; the torchrun runs
read the same stream through their own loader, inside the step timer. Rounds are interleaved (the machine is
shared); each run's median step after `--warmup` steps is kept, and the median over rounds is printed with ratios
to the reference. MFU = model FLOPs (6 x activated parameters per point + attention) over the measured fp32 GEMM
peak of this machine (all cores), split evenly between processes.

    python bench/train_step.py [--sizes tiny base] [--rounds 1] [--runs reference "ours 1p" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

SIZES = {  # windows of 512 points; global batch split into micro-batches of `micro` windows
    "tiny": {"global": 16, "micro": 8, "steps": 12},
    "base": {"global": 4, "micro": 2, "steps": 6},
}
MAX_LENGTH = 512
for _size in SIZES.values():
    _size["steps"] = int(os.environ.get("BENCH_STEPS", _size["steps"]))


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def common_overrides(size: str, peak: float, nproc: int) -> list[str]:
    s = SIZES[size]
    return [f"model={size}", "data=synthetic", f"data.max_length={MAX_LENGTH}", "logger=none",
            "logger.progress=false", f"trainer.max_steps={s['steps']}", f"trainer.global_batch_size={s['global']}",
            f"trainer.micro_batch_size={s['micro']}", "checkpoint.save_at_end=false", "checkpoint.interval=0",
            f"trainer.peak_flops_per_device={peak / nproc}", "trainer.device=cpu", "trainer.precision=fp32"]


def step_records(run_dir: Path, warmup: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    return {"points_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records)}


def run_ours(size: str, nproc: int, ep: int, peak: float, workdir: Path, warmup: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    overrides = [*common_overrides(size, peak, nproc), f"hydra.run.dir={run_dir}"]
    if ep > 1:
        overrides += ["parallel=expert", f"parallel.expert_parallel_size={ep}"]
    env = {**os.environ, "DS_BUILD_OPS": "0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "timemoe_train.train",
                           *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"timemoe-train failed:\n{proc.stderr[-4000:]}")
    return step_records(run_dir, warmup)


def run_ours_here(size: str, peak: float, workdir: Path, warmup: int, extra: tuple[str, ...] = ()) -> dict:
    """One process of our Trainer (a fresh one per run: DeepSpeed keeps its groups per process), fed micro-batches
    it builds before the trainer starts (its loader replaced by their list)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", size, str(peak), str(workdir), str(warmup)]
    proc = subprocess.run([*argv, *extra], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"timemoe-train (in process) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(size: str, peak: str, workdir: str, warmup: str, *extra: str) -> None:
    from hydra import compose, initialize_config_dir
    from host_syncs import PrebuiltBatches  # this script's folder is on the path

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    peak, warmup, batches = float(peak), int(warmup), global_batches(size)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*common_overrides(size, peak, 1), f"checkpoint.dir={run_dir}/checkpoints",
                                          *extra])
    trainer = make_trainer(cfg, run_dir)
    trainer.loader = PrebuiltBatches(batches, trainer.loader.domain_names)
    try:
        trainer.fit()
    finally:
        trainer.close()
    print(json.dumps(step_records(run_dir, warmup)))


def global_batches(size: str) -> list[dict]:
    """The micro-batches of every step of a run, as the trainer's synthetic loader yields them."""
    from timemoe_train.train.synthetic import SyntheticDataConfig

    s = SIZES[size]
    loader = iter(SyntheticDataConfig(max_length=MAX_LENGTH).build_train_loader(0, 1, s["global"], s["micro"]))
    return [next(loader) for _ in range(s["steps"] * (s["global"] // s["micro"]))]


def run_reference(size: str, peak: float, workdir: Path, batches: list[dict], warmup: int) -> dict:
    """What a user of the released code gets: its model class, a plain loop, one process."""
    import transformers

    from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
    from timemoe_train.train.metrics import segment_square_sum, train_flops

    s = SIZES[size]
    config = TimeMoeConfig.preset(size)
    hf_dir = workdir / f"reference-{size}"
    if not hf_dir.exists():
        torch.manual_seed(0)
        TimeMoeForPrediction(config).save_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).train()
    # Our engine's optimizer implementation (train/engine.py): fused AdamW.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gas = s["global"] // s["micro"]
    rates, mfus = [], []
    for step in range(s["steps"]):
        step_batches = batches[step * gas:(step + 1) * gas]
        start = time.perf_counter()
        for batch in step_batches:
            out = model(input_ids=batch["inputs"], labels=batch["labels"], loss_masks=batch["loss_mask"])
            (out.loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        points = sum(float((b["sequence_ids"] >= 0).sum()) for b in step_batches)
        square_sum = sum(float(segment_square_sum(b["sequence_ids"])) for b in step_batches)
        if step >= warmup:
            rates.append(points / elapsed)
            mfus.append(train_flops(config, points, square_sum) / (elapsed * peak))
    return {"points_per_s": statistics.median(rates), "mfu": statistics.median(mfus)}


def device_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({model}), shared: load average {load}; torch {torch.__version__}"


RUNS = ("reference 1p", "ours 1p", "ours 1p compile", "ours 2p EP1", "ours 2p EP2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (compilation)")
    parser.add_argument("--steps", type=int, help="steps per run (default: per size, see SIZES)")
    args = parser.parse_args()
    if args.steps:
        os.environ["BENCH_STEPS"] = str(args.steps)  # the child processes read it too
        for s in SIZES.values():
            s["steps"] = args.steps
    print(f"device: {device_line()}")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak (all cores): {peak / 1e9:.1f} GFLOP/s; windows of {MAX_LENGTH} points, fp32\n")
    w = args.warmup
    runs = {"reference 1p": lambda size, d, b: run_reference(size, peak, d, b, w),
            "ours 1p": lambda size, d, b: run_ours_here(size, peak, d, w),
            "ours 1p compile": lambda size, d, b: run_ours_here(size, peak, d, w, ("model.compile=true",)),
            "ours 2p EP1": lambda size, d, b: run_ours(size, 2, 1, peak, d, w),
            "ours 2p EP2": lambda size, d, b: run_ours(size, 2, 2, peak, d, w)}
    runs = {name: runs[name] for name in RUNS if name in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            batches = global_batches(size)
            results = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    results[name].append(fn(size, Path(tmp), batches))
            first = next(iter(results))
            ref = statistics.median(r["points_per_s"] for r in results[first])
            print(f"{size}: global batch {SIZES[size]['global']} x {MAX_LENGTH}, micro-batch {SIZES[size]['micro']}, "
                  f"{SIZES[size]['steps']} steps, median of the steps after the first {w}")
            for name, rs in results.items():
                rate = statistics.median(r["points_per_s"] for r in rs)
                mfu = statistics.median(r["mfu"] for r in rs)
                print(f"  {name:15s} {rate:10.0f} points/s   MFU {100 * mfu:5.1f}%   x{rate / ref:.2f} vs {first}")
            print()
    print(f"device (end): {device_line()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:])
    else:
        main()
