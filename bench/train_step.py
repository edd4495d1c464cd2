"""Training throughput (time points/s) and MFU of `timemoe-train`, side by side with a plain training step of the
reference model (the released code's scheme: HF model with a per-expert mask loop, torch AdamW, one process).

Runs, per model size, on the same synthetic global batches (fp32, CPU):
- reference:  1 process, the exported remote-code model, forward/backward/AdamW by hand (gradient accumulation)
- ours 1p:    timemoe-train on 1 process (EP=1)
- ours 2p:    timemoe-train on 2 processes, EP=1 (data parallel)
- ours 2p EP2: timemoe-train on 2 processes, experts split in two (megatron alltoall dispatch)
Rounds are interleaved (the machine is shared); each run's median step after the first is kept, and the median over
rounds is printed with ratios to the reference. MFU = model FLOPs (6 x activated parameters per point + attention)
over the measured fp32 GEMM peak of this machine (all cores), split evenly between processes.

    python bench/train_step.py [--sizes tiny base] [--rounds 1]
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
    "base": {"global": 4, "micro": 2, "steps": 4},
}
MAX_LENGTH = 512


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_ours(size: str, nproc: int, ep: int, peak: float, workdir: Path) -> dict:
    s = SIZES[size]
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    overrides = [f"model={size}", "data=synthetic", f"data.max_length={MAX_LENGTH}", "logger=none",
                 "logger.progress=false", f"trainer.max_steps={s['steps']}", f"trainer.global_batch_size={s['global']}",
                 f"trainer.micro_batch_size={s['micro']}", "checkpoint.save_at_end=false", "checkpoint.interval=0",
                 f"trainer.peak_flops_per_device={peak / nproc}", f"hydra.run.dir={run_dir}"]
    if ep > 1:
        overrides += ["parallel=expert", f"parallel.expert_parallel_size={ep}"]
    env = {**os.environ, "DS_BUILD_OPS": "0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "timemoe_train.train",
                           *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"timemoe-train failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {"points_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records)}


def run_reference(size: str, peak: float, workdir: Path) -> dict:
    """What a user of the released code gets: its model class, a plain loop, one process."""
    import transformers

    from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
    from timemoe_train.train.metrics import segment_square_sum, train_flops
    from timemoe_train.train.synthetic import SyntheticDataConfig

    s = SIZES[size]
    config = TimeMoeConfig.preset(size)
    hf_dir = workdir / f"reference-{size}"
    if not hf_dir.exists():
        torch.manual_seed(0)
        TimeMoeForPrediction(config).save_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    loader = iter(SyntheticDataConfig(max_length=MAX_LENGTH).build_train_loader(0, 1, s["global"], s["micro"]))
    gas = s["global"] // s["micro"]
    rates, mfus = [], []
    for step in range(s["steps"]):
        batches = [next(loader) for _ in range(gas)]
        start = time.perf_counter()
        for batch in batches:
            out = model(input_ids=batch["inputs"], labels=batch["labels"], loss_masks=batch["loss_mask"])
            (out.loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        points = sum(float((b["sequence_ids"] >= 0).sum()) for b in batches)
        square_sum = sum(float(segment_square_sum(b["sequence_ids"])) for b in batches)
        if step:
            rates.append(points / elapsed)
            mfus.append(train_flops(config, points, square_sum) / (elapsed * peak))
    return {"points_per_s": statistics.median(rates), "mfu": statistics.median(mfus)}


def device_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({model}), shared: load average {load}; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"device: {device_line()}")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak (all cores): {peak / 1e9:.1f} GFLOP/s; windows of {MAX_LENGTH} points, fp32\n")
    runs = {"reference 1p": lambda size, d: run_reference(size, peak, d),
            "ours 1p EP1": lambda size, d: run_ours(size, 1, 1, peak, d),
            "ours 2p EP1": lambda size, d: run_ours(size, 2, 1, peak, d),
            "ours 2p EP2": lambda size, d: run_ours(size, 2, 2, peak, d)}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    results[name].append(fn(size, Path(tmp)))
            ref = statistics.median(r["points_per_s"] for r in results["reference 1p"])
            print(f"{size}: global batch {SIZES[size]['global']} x {MAX_LENGTH}, micro-batch {SIZES[size]['micro']}")
            for name, rs in results.items():
                rate = statistics.median(r["points_per_s"] for r in rs)
                mfu = statistics.median(r["mfu"] for r in rs)
                print(f"  {name:13s} {rate:10.0f} points/s   MFU {100 * mfu:5.1f}%   x{rate / ref:.2f} vs reference")
            print()
    print(f"device (end): {device_line()}")


if __name__ == "__main__":
    main()
