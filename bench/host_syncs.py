"""Host syncs of a training step, counted on CPU: the ops that would make the host wait for a GPU.

On a GPU the host queues kernels ahead of the device; an op whose result the host must read (a scalar, or a size
that decides the next op's shape) drains that queue. For a model whose kernels are launch-bound, each such wait
costs throughput, and any one of them rules out CUDA graphs. The ops are the same on CPU, so a
`TorchDispatchMode` sees them there: `_local_scalar_dense` (`.item()`, `float()`, `bool()`), `nonzero`,
boolean-mask indexing, `bincount`, `unique`, `masked_select`, `repeat_interleave` without `output_size`, `equal`,
plus `Tensor.tolist()`/`.cpu()`/`.numpy()` (which leave no op behind on CPU and are counted at the call).

Three places, counted in a real `Trainer` run (one process, EP=1, ZeRO-1, fp32) on a non-logging step:
- model:        the engine's forward and backward, per micro-batch
- bookkeeping:  `StepStats.add`, per micro-batch
- optimizer step: everything else of the step (the step's all-reduce and the non-finite veto, DeepSpeed's step)
The headline uses the paths that must not sync: native MoE with the grouped GEMM and `dense_mask` attention (the
CPU-trainable stand-in for `flex`, which has no CPU backward). The paths that sync by design (`varlen` bucketing,
`expert_gemm=loop`) are counted on the model alone, for the record.

    python bench/host_syncs.py [--size base]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

_ALWAYS = {aten._local_scalar_dense.default: "item", aten.nonzero.default: "nonzero", aten.bincount.default: "bincount",
           aten._unique2.default: "unique", aten.unique_dim.default: "unique", aten._unique.default: "unique",
           aten.unique_consecutive.default: "unique", aten.masked_select.default: "masked_select",
           aten.equal.default: "equal"}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_HOST_READS = ("tolist", "cpu", "numpy")


def _sync_name(func, args, kwargs) -> str | None:
    if func in _ALWAYS:
        return _ALWAYS[func]
    if func in _INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return "boolean mask"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that sync the host, by kind, while active; `phase` labels where they happen."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()  # (phase, kind) -> count
        self.phase = "other"
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name:
            self.counts[self.phase, name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in _HOST_READS:
            original = self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._counting(method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    def _counting(self, method, original):
        def read(tensor, *args, **kwargs):
            self.counts[self.phase, method] += 1
            return original(tensor, *args, **kwargs)
        return read

    def total(self, phase: str) -> int:
        return sum(n for (p, _), n in self.counts.items() if p == phase)

    def kinds(self, phase: str) -> dict:
        return {kind: n for (p, kind), n in sorted(self.counts.items()) if p == phase}


class CudaSyncCounter:
    """The same phases on a GPU, watched by CUDA itself (`torch.cuda.set_sync_debug_mode`): any sync in the model
    or the bookkeeping raises; in the optimizer step each one is counted from its warning."""

    STRICT = ("model", "bookkeeping")

    def __init__(self):
        self.counts: Counter = Counter()
        self._phase = "other"
        self._caught = None

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        import torch

        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()  # what was queued before belongs to the phase before
        self._tally()
        self._phase = phase
        torch.cuda.set_sync_debug_mode("error" if phase in self.STRICT else "warn" if phase == "step" else 0)

    def _tally(self) -> None:
        if self._caught:
            self.counts[self._phase, "cuda sync"] += sum("synchroniz" in str(w.message) for w in self._caught)
            self._caught.clear()

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode(0)
        self._tally()
        self._warnings.__exit__(*exc)

    total, kinds = HostSyncCounter.total, HostSyncCounter.kinds


def synthetic_batches(count: int, micro: int, max_length: int) -> list[dict]:
    from timemoe_train.train.synthetic import SyntheticDataConfig

    loader = iter(SyntheticDataConfig(max_length=max_length).build_train_loader(0, 1, micro * count, micro))
    return [next(loader) for _ in range(count)]


def model_syncs(config, batch: dict) -> HostSyncCounter:
    """One forward+backward of the bare model (the second: the first resolves its paths and warms caches)."""
    from timemoe_train.model import TimeMoeForPrediction

    model = TimeMoeForPrediction(config).train()
    inputs = {"inputs_BT": batch["inputs"], "labels_BT": batch["labels"], "loss_mask_BT": batch["loss_mask"],
              "sequence_ids_BT": batch["sequence_ids"]}
    model(**inputs).loss.backward()
    counter = HostSyncCounter()
    with counter:
        counter.phase = "model"
        model(**inputs).loss.backward()
    return counter


def bookkeeping_syncs(config, batch: dict, num_domains: int = 4) -> HostSyncCounter:
    """`StepStats.add` of one micro-batch (with the per-domain expert load on)."""
    from timemoe_train.model import TimeMoeForPrediction
    from timemoe_train.train.metrics import StepStats

    model = TimeMoeForPrediction(config)
    out = model(batch["inputs"], batch["labels"], batch["loss_mask"], batch["sequence_ids"])
    stats = StepStats(config, num_domains, torch.device("cpu"))
    counter = HostSyncCounter()
    with counter:
        counter.phase = "bookkeeping"
        stats.add(out, batch)
    return counter


class PrebuiltBatches(list):
    """The micro-batches built before the run, standing in for the trainer's loader."""

    def __init__(self, batches: list[dict], domain_names: list[str]):
        super().__init__(batches)
        self.domain_names = domain_names


def trainer_syncs(size: str, micro: int, accumulation: int, max_length: int, extra: tuple = (),
                  device: str = "cpu") -> tuple:
    """Three steps of a real Trainer; step 2 (not a logging step) counted by phase. Returns (counter, accumulation).
    On "cuda": bf16 and the attention `auto` picks (FlexAttention), watched by `CudaSyncCounter`."""
    from hydra import compose, initialize_config_dir

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer
    from timemoe_train.train.metrics import StepStats

    steps = 3
    batches = synthetic_batches(steps * accumulation, micro, max_length)
    run_dir = Path(tempfile.mkdtemp())
    overrides = [f"model={size}", "data=synthetic", f"data.max_length={max_length}", "logger=none",
                 "logger.progress=false", f"logger.interval={steps}", f"logger.progress_interval={steps}", "logger.heatmap_interval=0",
                 f"trainer.max_steps={steps}", f"trainer.global_batch_size={micro * accumulation}",
                 f"trainer.micro_batch_size={micro}", "checkpoint.save_at_end=false", "checkpoint.interval=0",
                 f"checkpoint.dir={run_dir}/checkpoints", f"trainer.device={device}", "parallel.zero_stage=1", *extra]
    overrides += (["trainer.precision=fp32", "model.attn_impl=dense_mask"] if device == "cpu"
                  else ["trainer.precision=bf16", "model.attn_impl=auto"])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = make_trainer(cfg, run_dir)
    trainer.loader = PrebuiltBatches(batches, trainer.loader.domain_names)
    counter = HostSyncCounter() if device == "cpu" else CudaSyncCounter()
    engine = trainer.engine

    def in_phase(phase, fn):  # relabels within the counted step only
        def run(*args, **kwargs):
            outer = counter.phase
            if outer == "step":
                counter.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = outer
        return run

    step_of_record = {"n": 0}
    train_step = trainer._train_step

    def counted_step(*args, **kwargs):  # only step 2 is counted: step 1 warms up, step 3 is a logging step
        step_of_record["n"] += 1
        counter.phase = "step" if step_of_record["n"] == 2 else "uncounted"
        return train_step(*args, **kwargs)

    engine.forward = in_phase("model", engine.forward)
    engine.backward = in_phase("model", engine.backward)
    add = StepStats.add
    StepStats.add = in_phase("bookkeeping", add)
    trainer._train_step = counted_step
    try:
        with counter:
            trainer.fit()
    finally:
        StepStats.add = add
        trainer.close()
    return counter, accumulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--micro", type=int, default=1, help="windows per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("DS_BUILD_OPS", "0")
    sys.path.insert(0, str(REPO))
    from timemoe_train.model import TimeMoeConfig

    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}; "
          f"model {args.size}, {args.micro} x {args.max_length} points per micro-batch, fp32 CPU")
    batch = synthetic_batches(1, args.micro, args.max_length)[0]
    for attn, gemm in (("varlen", "grouped_mm"), ("dense_mask", "loop")):
        config = TimeMoeConfig.preset(args.size, attn_impl=attn, expert_gemm=gemm)
        c = model_syncs(config, batch)
        print(f"  model alone, attn_impl={attn}, expert_gemm={gemm} (syncs by design): {c.total('model')} "
              f"{c.kinds('model')}")
    c = model_syncs(TimeMoeConfig.preset(args.size, attn_impl="dense_mask", expert_gemm="grouped_mm"), batch)
    print(f"  model alone, attn_impl=dense_mask, expert_gemm=grouped_mm: {c.total('model')} {c.kinds('model')}")

    counter, gas = trainer_syncs(args.size, args.micro, args.accumulation, args.max_length)
    model, bookkeeping, step = (counter.total(p) for p in ("model", "bookkeeping", "step"))
    print(f"  trainer step 2 of 3 (not a logging step), {gas} micro-batches: model {counter.kinds('model')}, "
          f"bookkeeping {counter.kinds('bookkeeping')}, optimizer step {counter.kinds('step')}")
    print(f"host syncs per micro-batch: model {model / gas:g}, bookkeeping {bookkeeping / gas:g}; "
          f"per optimizer step: {step}")


if __name__ == "__main__":
    main()
