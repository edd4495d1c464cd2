"""Where the time of one training step goes: the reference's plain loop and our Trainer, side by side, each op's
time attributed to the code that issued it.

A `TorchDispatchMode` takes the CPU time of every aten op of one step (after a warm-up step; the process's CPU
time, so every intra-op thread counts and, unlike wall time, other processes on a shared machine do not) and
files it under the innermost frame of the code that called it: the model's forward (attention separately), the
model's backward (autograd: the ops under `.backward()` that no hook of ours or DeepSpeed's issued), DeepSpeed's
ZeRO gradient path and engine, our optimizer (clipping, fused AdamW), the non-finite guard's gradient hooks, the
step's bookkeeping, the trainer's loop. On the same pre-built batches and fused AdamW as bench/train_step.py (fp32, CPU, one process).
Timing each op adds a little per op: the step's wall and process CPU time are printed beside the sum of its ops.

    python bench/step_profile.py [--size base] [--top 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import train_step  # noqa: E402  (the same sizes, batches and overrides)

# (path fragment, where): the first that matches the innermost frame outside torch's own dispatch wins.
PLACES = [("timemoe_train/model/attention.py", "model forward: attention (layout + kernels)"),
          ("timemoe_train/model/", "model forward"), ("transformers_modules", "model forward"),
          ("timemoe_train/train/guard.py", "non-finite guard (gradient hooks, data check)"),
          ("timemoe_train/train/metrics.py", "bookkeeping (StepStats)"),
          ("timemoe_train/train/engine.py", "optimizer: clipping + fused AdamW"),
          ("torch/optim/", "optimizer: clipping + fused AdamW"),
          ("torch/nn/utils/clip_grad", "optimizer: clipping + fused AdamW"),
          ("deepspeed/runtime/zero/", "DeepSpeed ZeRO (gradient copies, norm, partitions)"),
          ("deepspeed/", "DeepSpeed engine"), ("timemoe_train/train/", "trainer loop"),
          ("step_profile.py", "trainer loop")]
BACKWARD = (("torch/_tensor.py", "backward"), ("torch/autograd/__init__.py", "backward"))


def place_of(stack) -> tuple[str, str]:
    for frame in reversed(stack):
        if any(frame.filename.endswith(f) and frame.name == n for f, n in BACKWARD):
            return "model backward (autograd)", "autograd"
        for fragment, where in PLACES:
            if fragment in frame.filename:
                return where, f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "other", "?"


class OpTimer(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seconds = defaultdict(float)  # (where, frame, op) -> s
        self.calls = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where, frame = place_of(traceback.extract_stack(limit=48)[:-1])
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        key = where, frame, func.overloadpacket.__name__
        self.seconds[key] += time.process_time() - start
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=list(train_step.SIZES))
    parser.add_argument("--top", type=int, default=12, help="(where, op) lines printed per run")
    args = parser.parse_args()
    s = train_step.SIZES[args.size]
    s["steps"] = 2
    batches = train_step.global_batches(args.size)
    print(f"device: {train_step.device_line()}")
    print(f"{args.size}: global batch {s['global']} x {train_step.MAX_LENGTH}, micro-batch {s['micro']}; "
          "one step after a warm-up step, CPU seconds of its ops by where they were issued")
    with tempfile.TemporaryDirectory() as tmp:
        start = train_step.initial_weights(args.size, Path(tmp))
        steps = {"reference 1p": train_step.reference_step(args.size, batches, start, Path(tmp) / "ref"),
                 "ours 1p": train_step.our_step(args.size, batches, start, Path(tmp) / "ours")}
        for step in steps.values():
            step(0)
        for name, step in steps.items():
            timer = OpTimer()
            wall, cpu = time.perf_counter(), time.process_time()
            with timer:
                step(1)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            total = sum(timer.seconds.values())
            print(f"\n{name}: step {wall:.2f} s wall, {cpu:.2f} s process CPU, {total:.2f} s CPU in ops "
                  f"(load average {os.getloadavg()[0]:.1f})")
            by_place = defaultdict(float)
            for (where, _, _), sec in timer.seconds.items():
                by_place[where] += sec
            for where, sec in sorted(by_place.items(), key=lambda kv: -kv[1]):
                print(f"  {sec:8.2f} s {100 * sec / total:5.1f}%  {where}")
            print("  top ops:")
            for key, sec in sorted(timer.seconds.items(), key=lambda kv: -kv[1])[:args.top]:
                where, frame, op = key
                print(f"  {sec:8.2f} s {timer.calls[key]:6d}x  {op:24s} {frame}")
    print(f"\ndevice (end): {train_step.device_line()}")


if __name__ == "__main__":
    main()
