"""Training throughput (time points per second) and MFU of `timemoe-train`, side by side with a plain training step
of the released-style model (bench/reference: the released code's modeling, eager attention, per-expert mask loop).

Runs, per model size, on the same synthetic packed windows (fp32, CPU), from the same initial weights (one HF
export), with the same optimizer implementation (torch's fused AdamW, as our engine uses), all computing the same
attention: a point sees the earlier points of its own piece only, at positions restarting per piece:
- reference:   1 process, bench/reference's code loaded from a copy of the export, forward/backward/AdamW by hand
               (gradient accumulation); the pieces handed to it as the released code takes them, a 4D block-diagonal
               causal `attention_mask` (dense, T x T) and `position_ids`
- ours 1p:     the timemoe-train Trainer in this process (EP=1, ZeRO-0 as `parallel.zero_stage` picks for one fp32
               process), attention as `model.attn_impl=auto` picks
- ours 1p ZeRO-1: the same at `parallel.zero_stage=1` (what one process ran before ZeRO-0 became its default)
- ours 1p compile: `ours 1p` with `model.compile=true` (per-block torch.compile)
- ours 2p EP1: timemoe-train on 2 processes (torchrun), EP=1 (data parallel)
- ours 2p EP2: timemoe-train on 2 processes, experts split in two (megatron alltoall dispatch)
The reference and the in-process runs are each a process of their own, all alive at once and stepped in
lockstep (step k of each before step k+1 of any); each builds the run's global batches before its first step and
times the whole step (forward, backward, clipping, AdamW) in the CPU seconds of its process, on `--threads` intra-op
threads (default 1): on a machine shared with other jobs neither the share of the cores they leave nor the stalls of
multi-threaded kernels at their barriers (threads descheduled) enter the figure. Each run's median step after
`--warmup` steps is kept; `--rounds` launches them again, and each round's ratio to the reference is printed beside
the median. The torchrun runs read the same stream through their own loader, one after another, timed by the
trainer's wall clock: not comparable on a shared machine. MFU = model FLOPs (6 x activated parameters per point +
attention) over the measured fp32 GEMM peak of this machine on as many threads, per process.
The last line: ours 1p over the reference, per size (the median over the rounds, and each round's).

    python bench/train_step.py [--sizes tiny base] [--rounds 1] [--threads 1] [--runs "reference 1p" "ours 1p" ...]
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

# Windows of 512 points; global batch split into micro-batches of `micro` windows. A base step's CPU seconds vary by
# ~8% from one step to the next on a shared machine (other jobs on the sibling hyperthreads): 22 steps after the
# warm-up keep the spread between launches under the ~5% between the arms.
SIZES = {
    "tiny": {"global": 16, "micro": 8, "steps": 12},
    "base": {"global": 4, "micro": 2, "steps": 24},
}
MAX_LENGTH = 512
for _size in SIZES.values():
    _size["steps"] = int(os.environ.get("BENCH_STEPS", _size["steps"]))
# Intra-op threads of every process (--threads, read by the child processes too): 1 keeps a machine shared with
# other jobs from stalling multi-threaded kernels at their barriers, which makes a CPU second a steady measure.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def gemm_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP per CPU second of a large fp32 GEMM: the same clock as the steps' (wall time would count the load)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_cpu_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def common_overrides(size: str, peak: float) -> list[str]:
    s = SIZES[size]
    return [f"model={size}", "data=synthetic", f"data.max_length={MAX_LENGTH}", "logger=none",
            "logger.progress=false", f"trainer.max_steps={s['steps']}", f"trainer.global_batch_size={s['global']}",
            f"trainer.micro_batch_size={s['micro']}", "checkpoint.save_at_end=false", "checkpoint.interval=0",
            f"trainer.peak_flops_per_device={peak}", "trainer.device=cpu", "trainer.precision=fp32"]


def step_records(run_dir: Path, warmup: int) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    return {"points_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records)}


def run_ours(size: str, nproc: int, ep: int, peak: float, start: Path, workdir: Path, warmup: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    overrides = [*common_overrides(size, peak), f"hydra.run.dir={run_dir}", f"trainer.init_from_hf={start}"]
    if ep > 1:
        overrides += ["parallel=expert", f"parallel.expert_parallel_size={ep}"]
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": str(THREADS),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "timemoe_train.train",
                           *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"timemoe-train failed:\n{proc.stderr[-4000:]}")
    return step_records(run_dir, warmup)


def released_inputs(batch: dict) -> dict:
    """A packed micro-batch as the released code takes it: the block-diagonal causal mask of its pieces as a 4D 0/1
    `attention_mask` and positions restarting per piece, so that it computes the attention ours does. (Its loss lets
    a head's targets run on into the next piece, where ours stops them: the same work, a slightly different sum.)"""
    from timemoe_train.model.attention import block_causal_mask, packed_positions

    ids_BT = batch["sequence_ids"]
    return {"input_ids": batch["inputs"], "labels": batch["labels"], "loss_masks": batch["loss_mask"],
            "attention_mask": block_causal_mask(ids_BT).unsqueeze(1).float(), "position_ids": packed_positions(ids_BT)}


def reference_step(size: str, batches: list[dict], start: Path, workdir: Path):
    """What a user of the released code gets: its modeling code (bench/reference), a plain loop (gradient
    accumulation by hand, clipping, our engine's fused AdamW), one process. Returns step(k), which runs global
    batch k."""
    import transformers
    from reference import released_style_copy

    model = transformers.AutoModelForCausalLM.from_pretrained(released_style_copy(start, workdir / "reference"),
                                                              trust_remote_code=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gas = SIZES[size]["global"] // SIZES[size]["micro"]
    inputs = [released_inputs(b) for b in batches]  # built before the first step, as ours are

    def step(k: int) -> None:
        for micro in inputs[k * gas:(k + 1) * gas]:
            (model(**micro).loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return step


def our_step(size: str, batches: list[dict], start: Path, workdir: Path, extra: tuple[str, ...] = ()):
    """The timemoe-train Trainer's step (one process, not a logging step) on global batch k."""
    from hydra import compose, initialize_config_dir

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*common_overrides(size, 1e12), "logger.interval=1000",
                                          "logger.progress_interval=1000", f"checkpoint.dir={workdir}/checkpoints",
                                          f"trainer.init_from_hf={start}", *extra])
    trainer = make_trainer(cfg, workdir)
    gas = trainer.gas

    def step(k: int) -> None:
        trainer._train_step(iter(batches[k * gas:(k + 1) * gas]), 0)
        trainer.step += 1
    return step


IN_PROCESS = {"reference 1p": ("reference",), "ours 1p": ("ours",),
              "ours 1p ZeRO-1": ("ours", "parallel.zero_stage=1"), "ours 1p compile": ("ours", "model.compile=true")}


def child(kind: str, size: str, start: str, workdir: str, *extra: str) -> None:
    """One in-process run, kept alive: runs global batch k for each k read from stdin, answering the CPU seconds
    this process spent on it (what other jobs on a shared machine take meanwhile is not in them)."""
    torch.set_num_threads(THREADS)
    batches, start, workdir = global_batches(size), Path(start), Path(workdir)
    step = (reference_step(size, batches, start, workdir) if kind == "reference"
            else our_step(size, batches, start, workdir, extra))
    print("bench: ready", flush=True)
    for line in sys.stdin:
        start = time.process_time()
        step(int(line))
        print(f"bench: {time.process_time() - start}", flush=True)


def run_in_lockstep(names: list[str], size: str, peak: float, start: Path, workdir: Path,
                    warmup: int) -> dict[str, dict]:
    """The in-process runs `names`, one process each, stepped alternately; points/s and MFU per run."""
    from timemoe_train.model import TimeMoeConfig
    from timemoe_train.train.metrics import segment_square_sum, train_flops

    procs, run_dirs = {}, {name: Path(tempfile.mkdtemp(dir=workdir)) for name in names}
    for name, run_dir in run_dirs.items():
        procs[name] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *IN_PROCESS[name][:1],
                                        size, str(start), str(run_dir), *IN_PROCESS[name][1:]], cwd=REPO, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=open(run_dir / "stderr.log", "w"))

    def answer(name: str) -> str:
        for line in procs[name].stdout:  # the trainer prints its own lines too
            if line.startswith("bench: "):
                return line[len("bench: "):].strip()
        sys.exit(f"{name} failed:\n{(run_dirs[name] / 'stderr.log').read_text()[-4000:]}")

    for name in names:
        answer(name)
    s, config = SIZES[size], TimeMoeConfig.preset(size)
    gas, batches = s["global"] // s["micro"], global_batches(size)
    rates, mfus = {n: [] for n in names}, {n: [] for n in names}
    for k in range(s["steps"]):
        step_batches = batches[k * gas:(k + 1) * gas]
        points = sum(float((b["sequence_ids"] >= 0).sum()) for b in step_batches)
        flops = train_flops(config, points, sum(float(segment_square_sum(b["sequence_ids"])) for b in step_batches))
        for name, proc in procs.items():
            proc.stdin.write(f"{k}\n")
            proc.stdin.flush()
            seconds = float(answer(name))
            if k >= warmup:
                rates[name].append(points / seconds)
                mfus[name].append(flops / (seconds * peak))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return {n: {"points_per_s": statistics.median(rates[n]), "mfu": statistics.median(mfus[n])} for n in names}


def initial_weights(size: str, workdir: Path) -> Path:
    """The HF-layout weights every run of `size` starts from: the same weights route each point to the same experts
    in every run."""
    from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

    torch.manual_seed(0)
    return TimeMoeForPrediction(TimeMoeConfig.preset(size)).save_pretrained(workdir / f"start_{size}")


def global_batches(size: str) -> list[dict]:
    """The micro-batches of every step of a run, as the trainer's synthetic loader yields them."""
    from timemoe_train.train.synthetic import SyntheticDataConfig

    s = SIZES[size]
    loader = iter(SyntheticDataConfig(max_length=MAX_LENGTH).build_train_loader(0, 1, s["global"], s["micro"]))
    return [next(loader) for _ in range(s["steps"] * (s["global"] // s["micro"]))]


def device_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core CPU ({model}), shared: load average {load}; torch {torch.__version__}"


RUNS = ("reference 1p", "ours 1p", "ours 1p ZeRO-1", "ours 1p compile", "ours 2p EP1", "ours 2p EP2")


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (compilation)")
    parser.add_argument("--steps", type=int, help="steps per run (default: per size, see SIZES)")
    parser.add_argument("--threads", type=int, default=THREADS, help="intra-op threads per process (default 1)")
    args = parser.parse_args()
    if args.steps:
        os.environ["BENCH_STEPS"] = str(args.steps)  # the child processes read it too
        for s in SIZES.values():
            s["steps"] = args.steps
    THREADS = args.threads
    os.environ["BENCH_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)
    print(f"device: {device_line()}")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak ({THREADS} thread{'s' * (THREADS > 1)}): {peak / 1e9:.1f} GFLOP per CPU-s; windows of "
          f"{MAX_LENGTH} points, fp32\n")
    w = args.warmup
    torchrun_runs = {"ours 2p EP1": 1, "ours 2p EP2": 2}
    names = [name for name in RUNS if name in args.runs]
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            start = initial_weights(size, Path(tmp))
            results = {name: [] for name in names}
            for _ in range(args.rounds):
                here = [name for name in names if name in IN_PROCESS]
                if here:
                    for name, result in run_in_lockstep(here, size, peak, start, Path(tmp), w).items():
                        results[name].append(result)
                for name in names:
                    if name in torchrun_runs:
                        results[name].append(run_ours(size, 2, torchrun_runs[name], peak, start, Path(tmp), w))
            print(f"{size}: global batch {SIZES[size]['global']} x {MAX_LENGTH}, micro-batch {SIZES[size]['micro']}, "
                  f"{SIZES[size]['steps']} steps, median of the steps after the first {w}, {THREADS} thread(s) per "
                  "process")
            ratios[size] = table(results)
            print()
    print(f"device (end): {device_line()}")
    if {"reference 1p", "ours 1p"} <= set(names):
        print("train step, ours 1p / the released-style reference, points per CPU second: " + ", ".join(
            f"{size} x{r['ours 1p'][0]:.2f} (rounds: {' '.join(f'{x:.2f}' for x in r['ours 1p'][1])})"
            for size, r in ratios.items()))


def table(results: dict[str, list[dict]]) -> dict[str, tuple[float, list[float]]]:
    """Print each run's median over the rounds; the in-process runs (stepped in lockstep, CPU seconds) as ratios to
    the first, each round's own ratio too (a round is one lockstep launch of them all). Returns those ratios."""
    here = [name for name in results if name in IN_PROCESS]
    first = results[here[0]] if here else None
    ratios = {}
    for name, rs in results.items():
        rate = statistics.median(r["points_per_s"] for r in rs)
        mfu = statistics.median(r["mfu"] for r in rs)
        if name in IN_PROCESS:
            rounds = [r["points_per_s"] / f["points_per_s"] for r, f in zip(rs, first)]
            ratios[name] = statistics.median(rounds), rounds
            print(f"  {name:15s} {rate:10.0f} points per CPU-s   MFU {100 * mfu:5.1f}%   x{ratios[name][0]:.2f} vs "
                  f"{here[0]}   (rounds: {' '.join(f'{x:.2f}' for x in rounds)})")
        else:  # its own launch after the others, timed by the trainer: wall clock, not comparable on a shared machine
            print(f"  {name:15s} {rate:10.0f} points/s wall   MFU {100 * mfu:5.1f}%   (own launch, the trainer's wall "
                  "clock)")
    return ratios


    print(f"device (end): {device_line()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:])
    else:
        main()
