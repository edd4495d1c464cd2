"""What a run says on rank 0: the start summary (corpus, epochs, parameters, layout, weights), plain progress lines
for a log that is not a terminal, and the end summary (steps, time, loss, checkpoint, the export command). Every
line goes to stdout and to the run's log file (`say`)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from torch import nn
from tqdm import tqdm

from ..model import TimeMoeConfig

PREFIX = "timemoe-train: "
_LOG = logging.getLogger("timemoe_train.train")


def say(line: str, terminal: bool = True) -> None:
    """A line for the user: on stdout (above the progress bar, when one is drawn) unless `terminal` is False, and in
    the run's log, `<run dir>/timemoe-train.log` (the file handler Hydra puts on the root logger), so that the log
    holds what the terminal showed. Not a logging call: on the terminal the line stays as it is, without the log's
    time stamp, and other handlers (a library's) never see it."""
    if terminal:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    record = _LOG.makeRecord(_LOG.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def start_message(run_dir: Path, checkpoint_dir: Path, tag: str | None, step: int | None) -> str:
    """What this launch does: the first line. A new run names its run directory, the path `run.dir=` takes back
    (and its checkpoint folder only when that lies elsewhere); a resume names the checkpoint."""
    if tag is not None:
        return f"{PREFIX}resuming from step {step} ({checkpoint_dir / tag})"
    elsewhere = "" if checkpoint_dir == run_dir / "checkpoints" else f"; checkpoints in {checkpoint_dir}"
    return f"{PREFIX}starting a new run in {run_dir}{elsewhere}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def parameter_counts(module: nn.Module, c: TimeMoeConfig, ep_size: int) -> tuple[int, int]:
    """(total, activated per point) of the whole model, from this rank's parameters: under expert parallelism it
    holds E / ep_size experts of each layer, under ZeRO-3 a partition of each tensor (DeepSpeed's `ds_numel` is
    the full size); each point passes through top-k experts of the E."""
    local = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    if c.use_dense:
        return local, local
    expert = 3 * c.hidden_size * c.expert_intermediate_size  # gate, up and down projections
    total = local + c.num_hidden_layers * (c.num_experts - c.num_experts // ep_size) * expert
    return total, total - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * expert


def windows_per_epoch(loader) -> int | None:
    """Rows one pass over the corpus fills (whole windows plus bins of packed short pieces); None for a source
    without epochs (the synthetic one)."""
    stream = getattr(loader, "stream", None)
    return sum(units.num_units for units in stream.groups) if stream is not None else None


def _corpus(loader, data_cfg) -> str:
    stream = getattr(loader, "stream", None)
    if stream is None:
        return f"corpus: synthetic series (seed {data_cfg.seed}, {len(loader.domain_names)} domains), no epochs"
    raw = stream.store.manifest.raw
    domains = sorted(raw["domains"])
    return (f"corpus {data_cfg.path}: {raw['totals']['sequences']:,} sequences, {raw['totals']['points']:,} points, "
            f"{len(domains)} domain{'s' * (len(domains) != 1)} ({', '.join(domains)})")


def _processes(n: int) -> str:
    return f"{n} process{'es' * (n != 1)}"


def layout_change(written: dict, now: dict) -> str | None:
    """'layout 2 processes EP=2 → 1 process EP=1' when a checkpoint's layout (meta.json) is not this run's."""
    if all(written.get(k) == v for k, v in now.items()):
        return None
    others = [k for k in now if k not in ("world_size", "ep_size") and written.get(k) != now[k]]

    def say(layout):
        return " ".join([_processes(layout["world_size"]), f"EP={layout['ep_size']}",
                         *(f"{k}={layout.get(k)}" for k in others)])

    return f"layout {say(written)} → {say(now)} (elastic resume)"


class RunReport:
    def __init__(self, trainer):
        self.trainer = trainer
        self.start_step = trainer.step
        self.started = time.monotonic()
        self.final_loss: float | None = None
        self.checkpoint: Path | None = None

    def start_lines(self, weights: str) -> list[str]:
        tr = self.trainer
        run, lay = tr.run, tr.layout
        t, p = run.trainer, run.parallel
        window = getattr(run.data, "max_length")
        lines = [_corpus(tr.loader, run.data)]
        steps = t.max_steps - tr.step
        per_epoch = windows_per_epoch(tr.loader)
        plan = f"steps {tr.step + 1}-{t.max_steps} of trainer.max_steps={t.max_steps}"
        if per_epoch is not None:
            lines.append(f"{per_epoch:,} windows per epoch (data.max_length={window}); this run: {plan}, "
                         f"{steps * t.global_batch_size:,} windows = {steps * t.global_batch_size / per_epoch:.2f} "
                         "epochs")
        else:
            lines.append(f"this run: {plan}")
        total, active = parameter_counts(tr.module.model, run.model, lay.ep_size)
        m = run.model
        shape = (f"{m.num_hidden_layers} layers, hidden {m.hidden_size}" +
                 ("" if m.use_dense else f", {m.num_experts} experts, top-{m.num_experts_per_tok}"))
        lines.append(f"model: {total:,} parameters, {active:,} activated per point ({shape}, "
                     f"{m.moe_impl} MoE)")
        lines.append(f"layout: {_processes(lay.world_size)} (data-parallel {lay.dp_size}, expert-parallel "
                     f"{lay.ep_size}), ZeRO-{p.zero_stage}, {t.precision} on {tr.device.type}; {t.global_batch_size} "
                     f"windows per step = {t.micro_batch_size} per micro-batch x {tr.gas} accumulation x "
                     f"{lay.dp_size} data-parallel; up to {t.global_batch_size * window:,} points per step")
        lines.append(f"weights: {weights}")
        if per_epoch is not None and per_epoch < t.global_batch_size:
            lines.append(f"warning: the corpus fills {per_epoch:,} windows, fewer than one step's "
                         f"{t.global_batch_size} (trainer.global_batch_size): every step repeats windows; use a "
                         "larger corpus, a smaller data.max_length or a smaller batch")
        return [PREFIX + line for line in lines]

    def end_lines(self, stopped: bool) -> list[str]:
        tr = self.trainer
        done = tr.step - self.start_step
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        verb = "stopped by signal" if stopped else "finished"
        lines = [f"{verb} at step {tr.step}: {done} step{'s' * (done != 1)} in "
                 f"{duration(time.monotonic() - self.started)}, final loss {loss}"]
        if self.checkpoint is not None:
            lines.append(f"checkpoint {self.checkpoint}")
            lines.append(f"export: timemoe-export {self.checkpoint} {tr.run_dir.resolve() / 'export'}")
        if stopped:
            lines.append("run the same command again to continue")
        return [PREFIX + line for line in lines]


class ProgressLines:
    """One plain line every `every` steps, at the last, and at the launch's first logged step (its time is the
    first estimate of how long the run takes), for a log file: step, loss, points/s, elapsed, ETA."""

    def __init__(self, total_steps: int, start_step: int, every: int):
        self.total, self.start_step, self.every = total_steps, start_step, every
        self.first = True
        self.started = time.monotonic()

    def line(self, record: dict) -> str | None:
        step, first = record["step"], self.first
        self.first = False
        if step % self.every and step != self.total and not first:
            return None
        elapsed = time.monotonic() - self.started
        remaining = elapsed / max(step - self.start_step, 1) * (self.total - step)
        loss = "nan" if record["loss"] is None else f"{record['loss']:.4f}"
        return (f"step {step}/{self.total}  loss {loss}  {record['tokens_per_s']:,.0f} points/s  "
                f"elapsed {duration(elapsed)}  ETA {duration(remaining)}")
