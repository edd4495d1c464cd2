"""Forecasts at scale: `timemoe-forecast` over a generated corpus of a million series, and what one roll-out costs at
base size, side by side in one run.

1. Scale (the installed command, `--out OUT/`, one thread per process): a synthetic prepared corpus of `--series`
   series (random walks with a daily cycle, 16-128 points, so a third are shorter than the 64-point context), and
   one of a tenth of them; 1 process and 2 processes (`--nproc-per-node 2`) over each, in the order tenth 1p, tenth
   2p, full 1p, full 2p. Series/s is the command's own last line (model loading included); peak RSS is the
   process's high-water mark (ru_maxrss of a small process that runs the command: one forked from this one would
   count this one's memory too), printed with the CPU seconds of its processes (series per CPU-second: what the
   work costs, whatever else the machine runs). The model: `--preset` (default tiny) with random weights: the
   pipeline's cost.
2. MoE at base (in this process, one thread, process CPU seconds; wall seconds on a GPU): `forecast()` of a batch
   of `--batch` contexts of 512 points, horizon 96, repeats interleaved, medians, for
   - moe:   the base model (8 experts of width 768, top-2, plus the shared expert of width 1536);
   - dense: a dense model of equal active parameters (one SwiGLU of width 3072);
   - every: the MoE model whose layers compute all 8 experts on every token and weight the unchosen by 0, as
            naive implementations do (`EveryExpert`; its forecasts equal the MoE's).
3. bf16: the same `forecast()` of the base MoE in bf16 against fp32, interleaved; its accuracy: the largest
   difference of the forecasts relative to their scale, and the MASE of both on ETTh1's OT (the last 512 points
   before each of `--windows` test windows, horizon 96, MASE against the seasonal (24 h) naive error of each
   context), of `--accuracy-model` (an export: a trained model says more than random weights) or the random base.
4. MFU: the useful FLOPs of the fp32 base MoE roll-out (`rollout_flops`: 2 per multiply-add of the weights each
   point passes through, the last layer's keys and values for every point and the rest for the last one, causal
   attention over the cache, the heads used) per CPU-second, over this machine's fp32 GEMM peak for one thread
   (the best of five 2048³ products, timed the same way).

    python bench/forecast_scale.py [--series 1000000] [--device cpu|cuda] [--skip-scale] [--accuracy-model DIR]

The last line: `forecast at scale: <n> series x <h> steps: 1 process <a> series/s, 2 processes <b> series/s; peak
RSS <g> GB; MoE <r>x the time of a dense model with equal active parameters, <m>x faster than computing every
expert; bf16 <f>x fp32; MFU <u>%` (g: the 1-process run over all the series).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.model.moe import route
from timemoe_train.model.rollout import head_schedule

REPO = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).with_name("timemoe-forecast")
ETTH1 = REPO / "examples" / "data" / "ETTh1.csv"
# Runs the command and says its peak RSS (KiB) and CPU seconds (its processes' all together).
MEASURED = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, s, use = os.wait4(p.pid, 0); " \
           "print(use.ru_maxrss, use.ru_utime + use.ru_stime, file=sys.stderr); sys.exit(os.waitstatus_to_exitcode(s))"
LAST_LINE = re.compile(r"forecast: (\d+) series × (\d+) steps in ([\d.]+) s, ([\d.]+) series/s on (\d+) processes")


def load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- 1. the corpus and the command ------------------------------------------------------------------------------

def write_corpus(directory: Path, series: int, shards: int, seed: int = 0) -> Path:
    """A prepared corpus through timemoe-prep's shard writer and manifest: `series` random walks with a daily
    cycle, 16-128 points each, in `shards` shards."""
    from data_prep.clean import new_counts
    from data_prep.corpus_manifest import build_manifest, write_manifest
    from data_prep.index import IndexedDataset
    from data_prep.shards import ShardWriter, make_batch, shard_name

    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries, points = [], 0
    for k, rows in enumerate(np.array_split(np.arange(series), shards)):
        lengths = rng.integers(16, 129, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        step = rng.standard_normal(offsets[-1]).astype(np.float32) * np.repeat(rng.uniform(0.1, 3, len(rows)),
                                                                                 lengths).astype(np.float32)
        walk = np.cumsum(step)
        walk -= np.repeat(walk[offsets[:-1]], lengths)  # each series its own walk
        t = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        level = np.repeat(rng.uniform(-10, 100, len(rows)), lengths)
        values = (level + walk + 5 * np.sin(2 * np.pi * t / 24)).astype(np.float32)
        path = directory / shard_name(k, shards)
        writer = ShardWriter(path)
        writer.write(make_batch([f"s{i}" for i in rows], "synthetic", "scale", "h", values, lengths))
        size, digest = writer.commit()
        stats = {"sequences": len(rows), "points": int(offsets[-1]), "cleaning": new_counts()}
        entries.append({"file": path.name, "rows": len(rows), "points": int(offsets[-1]), "bytes": size,
                        "sha256": digest, "datasets": {"synthetic/scale": stats}})
        points += int(offsets[-1])
    dataset = IndexedDataset("synthetic", "scale", "h", (), "", series, points, False, False)
    write_manifest(directory, build_manifest({}, [dataset], entries, [], []))
    return directory


def forecast_run(model_dir: Path, corpus: Path, out: Path, nproc: int, args) -> dict:
    """The command over `corpus`, one thread per process: its last line's figures and its peak RSS."""
    cmd = [str(COMMAND), str(model_dir), "--input", str(corpus), "--horizon", str(args.horizon), "--context-length",
           str(args.context_length), "--out", str(out), "--no-progress", "--device", args.device]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    before = load()
    proc = subprocess.run([sys.executable, "-c", MEASURED, *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    lines = proc.stderr.strip().splitlines()
    series, _, seconds, rate, _ = LAST_LINE.search(lines[-2]).groups()
    rss_kib, cpu_s = lines[-1].split()
    result = {"series": int(series), "seconds": float(seconds), "rate": float(rate), "rss_gb": int(rss_kib) / 2**20,
              "cpu_s": float(cpu_s), "load": f"{before} -> {load()}"}
    print(f"  {nproc} process{'es' if nproc > 1 else ''}, {result['series']} series: {result['rate']:.0f} series/s "
          f"({result['seconds']:.0f} s; {result['series'] / result['cpu_s']:.0f} series per CPU-second), peak RSS "
          f"{result['rss_gb']:.2f} GB ({result['load']})", flush=True)
    return result


# --- 2.-4. one roll-out at base size ------------------------------------------------------------------------------

class EveryExpert(nn.Module):
    """A sparse layer computed as naive MoE code does: every expert on every token, the unchosen weighted by 0."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x_BTD):
        layer, experts = self.layer, self.layer.experts
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, weights_NK, experts_NK = route(layer.gate, x_ND, layer.top_k)
        w_NE = torch.zeros_like(logits_NE).scatter_(1, experts_NK, weights_NK).to(x_ND.dtype)
        h_ENI = F.silu(x_ND @ experts.gate_proj_EIH.transpose(1, 2)) * (x_ND @ experts.up_proj_EIH.transpose(1, 2))
        y_END = h_ENI @ experts.down_proj_EHI.transpose(1, 2)
        routed_ND = (y_END * w_NE.T.unsqueeze(-1)).sum(0)
        shared_ND = torch.sigmoid(layer.shared_expert_gate(x_ND)) * layer.shared_expert(x_ND)
        return (routed_ND + shared_ND).view(B, T, D), logits_NE


def ffn_weights(c: TimeMoeConfig, every: bool = False) -> int:
    """Weights one point multiplies with in a feed-forward block (the router's included)."""
    if c.use_dense:
        return 3 * c.hidden_size * c.intermediate_size
    experts = c.num_experts if every else c.num_experts_per_tok
    return (experts * 3 * c.hidden_size * c.expert_intermediate_size + 3 * c.hidden_size * c.intermediate_size
            + c.hidden_size + c.hidden_size * c.num_experts)


def rollout_flops(c: TimeMoeConfig, batch: int, context: int, horizon: int, every: bool = False) -> float:
    D, L = c.hidden_size, c.num_hidden_layers
    kv = c.num_key_value_heads * c.head_dim
    qo, ffn = 2 * D * D, ffn_weights(c, every)
    schedule = [c.horizon_lengths[j] for j in head_schedule(horizon, c.horizon_lengths)]
    flops, past = 0.0, 0
    for new, head in zip([context] + schedule[:-1], schedule):
        attention = 4 * D * new * (past + (new + 1) / 2)  # QKᵀ and AV, each query over the keys up to itself
        flops += 2 * new * 2 * D  # the embedding's two projections
        flops += (L - 1) * (2 * new * (qo + 2 * D * kv + ffn) + attention)
        flops += 2 * new * 2 * D * kv + 2 * (qo + ffn) + 4 * D * (past + new) + 2 * D * head  # last layer, head
        past += new
    return batch * flops


def timed(fn, device: str) -> float:
    """CPU: this process's CPU seconds (on a shared machine, what the work costs, not what others took meanwhile);
    GPU: wall seconds."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def gemm_peak(device: str, dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, device) for _ in range(5))


def contexts(batch: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    t = torch.arange(length, dtype=torch.float32)
    season = torch.sin(2 * np.pi * t / 24) * torch.rand(batch, 1, generator=g) * 3
    return (10 + season + torch.randn(batch, length, generator=g).cumsum(1) * 0.3).to(device)


def interleaved(models: dict, context_BT: torch.Tensor, horizon: int, repeats: int, device: str) -> dict:
    for model in models.values():  # warm-up
        model.forecast(context_BT[:1], horizon)
    times = {name: [] for name in models}
    for r in range(repeats):
        for name, model in models.items():
            times[name].append(timed(lambda: model.forecast(context_BT, horizon), device))
        print(f"    round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()) + f" ({load()})",
              flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def mase_on_etth1(model, windows: int, device: str) -> float:
    values = pd.read_csv(ETTH1)["OT"].to_numpy(np.float32)
    test_start, context, horizon, season = 12 * 30 * 24 + 4 * 30 * 24, 512, 96, 24
    starts = np.linspace(test_start, len(values) - horizon, windows).astype(int)
    context_BT = torch.from_numpy(np.stack([values[s - context:s] for s in starts])).to(device)
    truth_BH = np.stack([values[s:s + horizon] for s in starts])
    forecast_BH = model.forecast(context_BT, horizon).float().cpu().numpy()
    ctx = context_BT.cpu().numpy()
    scale_B = np.abs(ctx[:, season:] - ctx[:, :-season]).mean(axis=1)
    return float(np.mean(np.abs(forecast_BH - truth_BH).mean(axis=1) / scale_B))


def base_arms(args) -> dict:
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # a GPU's MoE arms in what it serves in
    torch.manual_seed(0)
    base = TimeMoeConfig.preset(args.arms_preset)
    moe = TimeMoeForPrediction(base).eval().to(device, dtype)
    dense = TimeMoeForPrediction(TimeMoeConfig.preset(args.arms_preset, use_dense=True,
                                                      intermediate_size=2 * base.intermediate_size))
    dense = dense.eval().to(device, dtype)
    every = copy.deepcopy(moe)
    for layer in every.model.layers:
        layer.ffn_layer = EveryExpert(layer.ffn_layer)
    context_BT = contexts(args.batch, 512, device)
    with torch.no_grad():
        a, b = moe.forecast(context_BT, 96), every.forecast(context_BT, 96)
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-3, "every-expert forecasts differ from the MoE's"
        flops = {name: rollout_flops(c, args.batch, 512, 96, every=name == "every")
                 for name, c in (("moe", base), ("dense", dense.config), ("every", base))}
        print(f"  {args.arms_preset}, batch {args.batch}, context 512, horizon 96, {str(dtype).removeprefix('torch.')}: GFLOP per "
              "roll-out " + ", ".join(f"{n} {f / 1e9:.1f}" for n, f in flops.items()), flush=True)
        times = interleaved({"moe": moe, "dense": dense, "every": every}, context_BT, 96, args.repeats, device)
        del every, dense
        peak = gemm_peak(device, dtype)
        print(f"  {str(dtype).removeprefix('torch.')} GEMM peak, {torch.get_num_threads()} thread(s): "
              f"{peak / 1e9:.1f} GFLOP/s", flush=True)
        result = {"r": times["moe"] / times["dense"], "m": times["every"] / times["moe"],
                  "u": flops["moe"] / times["moe"] / peak, "times": times}

        print("  bf16 against fp32, the base MoE:", flush=True)
        fp32 = moe.float()
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        dtimes = interleaved({"fp32": fp32, "bf16": bf16}, context_BT, 96, args.repeats, device)
        a, b = fp32.forecast(context_BT, 96), bf16.forecast(context_BT, 96)
        result["f"] = dtimes["fp32"] / dtimes["bf16"]
        result["bf16_difference"] = ((a - b).abs().max() / a.abs().max()).item()
        if args.accuracy_model:
            from timemoe_train.forecast import load_model

            fp32 = load_model(args.accuracy_model, device=device)
            bf16 = load_model(args.accuracy_model, device=device, dtype="bfloat16")
        result["mase"] = {name: mase_on_etth1(m, args.windows, device) for name, m in (("fp32", fp32),
                                                                                        ("bf16", bf16))}
    return result


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} CPUs, bf16 units: "
            f"{', '.join(bf16) or 'none'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--preset", default="tiny", help="the model of the scale runs (random weights)")
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--horizon", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="contexts per roll-out of the base-size arms")
    p.add_argument("--arms-preset", default="base", help="the model of the MoE arms (tiny: a quick run of the bench)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=64, help="ETTh1 windows of the bf16 accuracy check")
    p.add_argument("--accuracy-model", help="an export for the bf16 accuracy check (default: the random base)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--skip-scale", action="store_true", help="only the base-size arms")
    p.add_argument("--workdir", type=Path, default=None, help="where the corpora go (default: a temporary folder)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    print(f"{cpu_name() if args.device == 'cpu' else torch.cuda.get_device_name()}; {load()}", flush=True)

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        scale = {}
        if not args.skip_scale:
            started = time.perf_counter()
            full = write_corpus(tmp / "full", args.series, args.shards)
            tenth = write_corpus(tmp / "tenth", args.series // 10, max(1, args.shards // 10), seed=1)
            print(f"corpora of {args.series} and {args.series // 10} series written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            torch.manual_seed(0)
            model_dir = TimeMoeForPrediction(TimeMoeConfig.preset(args.preset)).save_pretrained(tmp / "model")
            print(f"scale: {args.preset} model, context {args.context_length}, horizon {args.horizon}, "
                  "one thread per process", flush=True)
            for name, corpus in (("tenth", tenth), ("full", full)):
                for nproc in (1, 2):
                    scale[name, nproc] = forecast_run(model_dir, corpus, tmp / f"out-{name}-{nproc}", nproc, args)
        print("base-size arms (one thread):", flush=True)
        arms = base_arms(args)

    print(f"MoE / dense (equal active parameters): {arms['r']:.2f}x the time; every expert / MoE: {arms['m']:.2f}x; "
          f"bf16: {arms['f']:.2f}x fp32, forecasts differ by {arms['bf16_difference']:.1e} of their scale, MASE on "
          f"ETTh1 OT fp32 {arms['mase']['fp32']:.4f}, bf16 {arms['mase']['bf16']:.4f}; MFU {100 * arms['u']:.0f}%",
          flush=True)
    if scale:
        a, b = scale["full", 1], scale["full", 2]
        print(f"tenth: 1 process {scale['tenth', 1]['rate']:.0f} series/s, 2 processes {scale['tenth', 2]['rate']:.0f} "
              f"series/s, peak RSS {scale['tenth', 1]['rss_gb']:.2f} GB; full: peak RSS {a['rss_gb']:.2f} GB "
              f"(2 processes: {b['rss_gb']:.2f} GB per process at most); {load()}", flush=True)
        print(f"forecast at scale: {a['series']} series x {args.horizon} steps: 1 process {a['rate']:.0f} series/s, "
              f"2 processes {b['rate']:.0f} series/s; peak RSS {a['rss_gb']:.2f} GB; MoE {arms['r']:.2f}x the time of "
              f"a dense model with equal active parameters, {arms['m']:.2f}x faster than computing every expert; "
              f"bf16 {arms['f']:.2f}x fp32; MFU {100 * arms['u']:.0f}%")


if __name__ == "__main__":
    main()
