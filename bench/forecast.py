"""Forecast speed of the exported modeling code against the released code's way of computing, same weights, side by
side in one run (repeats interleaved: the machine may be shared), medians reported.

- exported:  the remote code every export ships (timemoe_train/model/remote_code/modeling_time_moe.py)
- reference: bench/reference/modeling_time_moe.py, computing what the released code computes the way it computes
             it (eager attention with an additive mask, a Python loop over experts with `torch.where` +
             `index_add_`, every head at every position): the export's code before it was made fast.
- library:   `TimeMoeForPrediction.forecast()` on the same weights (what timemoe-eval, the fine-tuning report and
             `timemoe-forecast --backend native` run); the speed-up line does not read it.
Times are CPU seconds of the process on CPU (see `timed`), wall seconds on a GPU. Both are loaded from the same
export directory through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, the reference as its
own copy of that directory with its modeling file swapped in.
Random base-size weights (routing close to uniform, like a trained model's balanced experts), context 512,
batches 8 and 32, horizons 96 (64 + 32) and 720 (11 x 64 + 8 + 8); CPU fp32, and CUDA bf16 when present.
The last line is the CPU speed-up of the slowest batch size: the smaller ratio over batches 8 and 32, per horizon; the
line before it per device (CUDA bf16 too when present).

    python bench/forecast.py [--preset base] [--batches 8,32] [--repeats 3] [--threads N] [--profile]

Measured (2-core AMD EPYC shared with other jobs, load average 12-16, `--threads 1 --repeats 2`, CPU seconds,
reference -> exported): batch 8: h96 10.57 -> 6.41 s (x1.65), h720 21.63 -> 14.27 s (x1.52); batch 32: h96
46.48 -> 28.45 s (x1.63), h720 110.84 -> 59.05 s (x1.88); `forecast speed-up: h96 1.63x, h720 1.52x`. The 3x
goal is out of reach in fp32 on this CPU: the exported roll-out is 78% GEMMs (batch 8, h96: 423 GFLOP against the
reference's 501, at ~88 GFLOP/s per core, MKL's best on these shapes), so a roll-out of nothing but its GEMMs would
still be only ~2.2x at h96, and ~1.85x at h720 batch 8, where attention over the growing cache adds its own FLOPs.
Not in this script, measured once by hand (load ~5): `for layer in model.model.layers: layer.compile()` takes the
exported code from 6.43 to 5.74 CPU s at batch 8, h96 (x1.12 more, same forecasts within 4e-6, 107 s to compile; the
per-expert token counts make dynamo recompile until its limit, after which the expert loop stays eager).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reference import released_style_copy
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

HORIZONS = (96, 720)


def export_pair(preset: str, root: Path) -> tuple[Path, Path]:
    """One export with random weights, and its copy running the reference modeling code."""
    torch.manual_seed(0)
    exported = root / f"exported_{preset}"
    TimeMoeForPrediction(TimeMoeConfig.preset(preset)).save_pretrained(exported)
    return exported, released_style_copy(exported, root / f"reference_{preset}")


def load(directory: Path, device: str, dtype: torch.dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    return model.to(device).eval()


def contexts(batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    t = torch.arange(length, dtype=torch.float32)
    season = torch.sin(2 * math.pi * t / 24) * torch.rand(batch, 1, generator=g) * 3
    return 10 + season + torch.randn(batch, length, generator=g).cumsum(1) * 0.3


def timed(model, context_BT: torch.Tensor, horizon: int) -> float:
    """GPU: wall seconds. CPU: this process's CPU seconds, which on a machine shared with other jobs measure the
    forecast and not how much of the machine those jobs took meanwhile (the wall time of a whole run says both)."""
    if context_BT.is_cuda:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.forecast(context_BT, horizon)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    model.forecast(context_BT, horizon)
    return time.process_time() - start


def measure(models: dict, device: str, batches, context_length: int, repeats: int) -> dict:
    """(batch, horizon) -> name -> median seconds; one warm-up each, then repeats interleaved."""
    out, started = {}, time.perf_counter()
    for batch in batches:
        context_BT = contexts(batch, context_length).to(device)
        for horizon in HORIZONS:
            times = {name: [] for name in models}
            for name, model in models.items():
                model.forecast(context_BT[:1], horizon)
            for _ in range(repeats):
                for name, model in models.items():
                    times[name].append(timed(model, context_BT, horizon))
            out[batch, horizon] = {name: statistics.median(t) for name, t in times.items()}
            row = out[batch, horizon]
            print(f"  batch {batch:3d}  h {horizon:4d}   reference {row['reference']:7.2f} s   exported "
                  f"{row['exported']:7.2f} s   x{row['reference'] / row['exported']:.2f}   library "
                  f"{row['library']:7.2f} s   x{row['reference'] / row['library']:.2f}   (wall so far "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)
    return out


def profile(model, context_BT: torch.Tensor, horizon: int, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model.forecast(context_BT, horizon)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default torch's); 1 keeps a machine shared with other jobs from "
                        "stalling multi-threaded kernels at their barriers")
    p.add_argument("--profile", action="store_true", help="also print the top ops of the exported roll-out "
                                                          "(batch 8, h 96)")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        exported, reference = export_pair(args.preset, Path(tmp))
        devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
        results = {}
        for device, dtype in devices:
            library = TimeMoeForPrediction.from_pretrained(exported).to(device, dtype).eval()
            models = {"reference": load(reference, device, dtype), "exported": load(exported, device, dtype),
                      "library": library}
            print(f"{device} {str(dtype).removeprefix('torch.')}, preset {args.preset}, context "
                  f"{args.context_length}, {torch.get_num_threads()} threads, {args.repeats} repeats, medians "
                  f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
            results[device] = measure(models, device, batches, args.context_length, args.repeats)
            if args.profile and device == "cpu":
                profile(models["exported"], contexts(8, args.context_length), 96)
            del models
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    speedup = {device: {h: min(r[b, h]["reference"] / r[b, h]["exported"] for b in batches) for h in HORIZONS}
               for device, r in results.items()}
    for (device, dtype), s in zip(devices, speedup.values()):  # bench/gpu_check.sh reads the CUDA one
        print(f"{device} {str(dtype).removeprefix('torch.')} forecast speed-up, released-style / exported time: "
              f"h96 {s[96]:.2f}x, h720 {s[720]:.2f}x")
    print(f"forecast speed-up: h96 {speedup['cpu'][96]:.2f}x, h720 {speedup['cpu'][720]:.2f}x")


if __name__ == "__main__":
    main()
