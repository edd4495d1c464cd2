"""The training loop: parallel layout, model, engine, data, checkpoints, guard and monitoring, put together."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import read_meta
from ..data.loader import STOP_SIGNALS
from ..model.hf_layout import load_hf_state
from ..model import TimeMoeForPrediction
from ..parallel import init_parallel
from .checkpointer import Checkpointer
from .config import RunConfig
from .engine import build_engine, global_grad_norm, learning_rate, op_build_note, set_learning_rate
from .guard import NonFiniteGuard
from .metrics import (StepStats, domain_heatmaps, expert_load_metrics, peak_flops, reduce_domain_load,
                      train_flops)
from .module import TrainModule, initial_hf_state
from .monitor import Monitor
from .report import PREFIX, RunReport, layout_change, say, start_message
from .validation import Validator

_MODEL_INPUTS = {"inputs": "inputs_BT", "labels": "labels_BT", "loss_mask": "loss_mask_BT",
                 "sequence_ids": "sequence_ids_BT"}


def build_loader(data_cfg, dp_rank: int, dp_size: int, global_batch_size: int, micro_batch_size: int):
    """The data group's loader: a config object may bring its own (the synthetic source), else the Arrow one."""
    if hasattr(data_cfg, "build_train_loader"):
        return data_cfg.build_train_loader(dp_rank, dp_size, global_batch_size, micro_batch_size)
    from ..data import build_train_loader

    return build_train_loader(data_cfg, dp_rank, dp_size, global_batch_size, micro_batch_size)


class StopRequest:
    """SIGTERM, SIGUSR1 (SLURM's warning) and SIGINT (Ctrl-C) only raise a flag; every rank learns of it in the
    step's all-reduce, so all of them finish that step, save it, shut their loader workers down and exit 0.

    A second Ctrl-C exits at once without saving (status 130). Launchers may deliver one signal twice (torchrun
    forwards what SLURM also sends to every process), so a repeat within a second is the same request. Before the
    first step (`armed` false) there is nothing to save: the process exits at once, status 0. When the launcher
    itself died (its parent-death signal, see `__main__`), nobody waits for this process any more: it gets
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, as torchrun would give it, to save and leave."""

    def __init__(self):
        self.signum: int | None = None
        self.armed = False
        self._at = 0.0
        self._parent = os.getppid()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.armed:
            os.write(2, f"timemoe-train: {signal.Signals(signum).name} before the first step: exiting\n".encode())
            os._exit(0)
        if os.getppid() != self._parent and self.signum is None:
            grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
            deadline = threading.Timer(grace, os._exit, (1,))
            deadline.daemon = True
            deadline.start()
        if self.signum is None:
            self.signum, self._at = signum, now
        elif signum == signal.SIGINT and now - self._at > 1.0:
            if os.environ.get("LOCAL_RANK", "0") == "0":  # said once per node, as by one process
                os.write(2, b"timemoe-train: second interrupt: exiting without saving\n")
            os._exit(128 + signal.SIGINT)

    def restore(self) -> None:
        """The handlers from before (the next job of a multirun installs its own)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, run: RunConfig, run_dir: str | Path, config_yaml: str, config_dict: dict,
                 resume_tag: str | None = None):
        """`resume_tag`: the checkpoint to resume from (`timemoe_train.checkpoint.resume.resume_point`, verified by
        all ranks together before any engine start-up)."""
        self.run, self.run_dir, self.config_yaml = run, Path(run_dir), config_yaml
        self.stop = StopRequest()  # from the start: a signal during set-up ends the process at once
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists, also in a plain one-process run
        p, t = run.parallel, run.trainer
        self.layout = init_parallel(p.expert_parallel_size, num_experts=run.model.num_experts)
        lay = self.layout
        # Before the model and engine: a bad data.path is reported without waiting for their start-up, and before
        # the first line: a corpus that does not fit the config is the launch's only line.
        self.loader = build_loader(run.data, lay.dp_rank, lay.dp_size, t.global_batch_size, t.micro_batch_size)
        if lay.is_main:
            step = read_meta(Path(run.checkpoint.dir).resolve() / resume_tag)["step"] if resume_tag else None
            say(start_message(self.run_dir.resolve(), Path(run.checkpoint.dir).resolve(), resume_tag, step))
        self.validator = Validator(run.data, t, lay.dp_rank, lay.dp_size) if t.val_interval else None
        self.device = torch.device("cuda", lay.local_rank) if (
            t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())) else torch.device("cpu")
        self.gas = run.gradient_accumulation_steps(lay.world_size)

        # Built without storage, then given only what this rank owns (under megatron, its own experts).
        with torch.device("meta"):
            model = TimeMoeForPrediction(run.model)
        model = load_hf_state(model.to_empty(device="cpu"),
                              initial_hf_state(run.model, t.seed, t.init_from_hf, lay.ep_rank, lay.ep_size),
                              lay.ep_rank, lay.ep_size)
        self.module = TrainModule(model, lay.ep_size, with_markers=p.zero_stage < 3).to(self.device)
        torch.manual_seed(t.seed * 7919 + lay.rank)  # dropout and anything else random differs per rank
        self.guard = NonFiniteGuard(self.module, t.max_bad_steps, self.device, self.gas)
        note = op_build_note(self.device)
        if note and lay.is_main:
            say(PREFIX + note)
        self.engine, self.optimizer = build_engine(self.module, run, self.gas,
                                                   lay.ep_group if lay.ep_size > 1 else None)
        if run.model.aux_loss_type == "megatron":
            from ..model.moe_megatron import set_aux_loss_scale

            set_aux_loss_scale(self.gas)

        self.domain_names = list(getattr(self.loader, "domain_names", None) or [])
        self.checkpointer = Checkpointer(run.checkpoint, self.engine, self.module, lay.rank, lay.world_size)
        self.step = 0
        self.wandb_id = None
        self.weights = f"initialised from {t.init_from_hf}" if t.init_from_hf else f"random (trainer.seed={t.seed})"
        self._resume(resume_tag)
        self.monitor = Monitor(self.run_dir, run.logger, lay.is_main, config_dict, t.max_steps, self.step,
                               self.wandb_id)
        self.report = RunReport(self)
        self.peak = peak_flops(t.peak_flops_per_device)
        self.stopped = False  # fit() ended on a stop signal, after saving

    # --- checkpoints ---------------------------------------------------------------------------------------
    def _layout_meta(self) -> dict:
        """What DeepSpeed's own checkpoint files depend on: resuming under other values takes the elastic path."""
        p = self.run.parallel
        return {"world_size": self.layout.world_size, "ep_size": self.layout.ep_size, "zero_stage": p.zero_stage,
                "precision": self.run.trainer.precision, "moe_impl": self.run.model.moe_impl,
                "offload_optimizer": p.offload_optimizer}

    def _resume(self, tag: str | None) -> None:
        if tag is None:
            return
        state = self.checkpointer.load(tag, self._layout_meta(), self.run.trainer.seed)
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])
        if self.validator is not None and "validation" in state:
            self.validator.load_state_dict(state["validation"])
        self.wandb_id = state.get("wandb_id")
        change = layout_change(read_meta(self.checkpointer.root / tag), self._layout_meta())
        self.weights = f"resumed from step {self.step} ({self.checkpointer.root / tag})" + (
            f"; {change}" if change else "")

    def save(self, best: bool = False) -> Path:
        state = {"step": self.step, "loader": self.loader.state_dict(), "guard": self.guard.state_dict(),
                 "wandb_id": self.monitor.wandb_id}
        if self.validator is not None:
            state["validation"] = self.validator.state_dict()
        meta = {**self._layout_meta(), "model": dataclasses.asdict(self.run.model),
                "precision": self.run.trainer.precision, "expert_aliases": self.module.expert_aliases}
        path = self.report.checkpoint = self.checkpointer.save(self.step, state, meta, self.config_yaml, best)
        self.monitor.message(f"checkpoint {path}" + (" (writing in the background)"
                                                      if self.run.checkpoint.async_save else ""))
        return path

    # --- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> None:
        t, c = self.run.trainer, self.run.checkpoint
        batches = iter(self.loader)
        self.stop.armed = True
        num_domains = len(self.domain_names) if self.run.logger.heatmap_interval else 0
        domain_load = None
        saved_at = self.step
        for line in self.report.start_lines(self.weights):
            self.monitor.message(line)
        try:
            while self.step < t.max_steps and not (self.validator and self.validator.exhausted):
                summary, stats, elapsed = self._train_step(batches, num_domains)
                self.step += 1
                reduced = summary["reduced"]
                if reduced.save_failed:  # on every rank in this step: raises CheckpointWriteError
                    self.checkpointer.wait()
                self.guard.record(reduced.nonfinite)
                validated = bool(t.val_interval) and (self.step % t.val_interval == 0 or self.step == t.max_steps)
                if validated:
                    summary["val_loss"] = self.validator.score(self.engine, self._model_inputs, self.device)
                best = validated and self.validator.update(self.step, summary["val_loss"])
                if num_domains:  # before the step's record, which completes the step's W&B row
                    domain_load = stats.domain_load_DLE if domain_load is None else domain_load + stats.domain_load_DLE
                    if self.step % self.run.logger.heatmap_interval == 0:
                        self._log_heatmaps(domain_load)
                        domain_load = None
                # The step's statistics are read back to the host on logging steps only (and at the last step,
                # for the end summary's loss).
                if (validated or reduced.stop or self.step % self.run.logger.interval == 0
                        or self.step == t.max_steps):
                    self._log(summary, elapsed)
                self.guard.check(self.step)
                if reduced.stop or best or (c.interval and self.step % c.interval == 0):
                    self.save(best)
                    saved_at = self.step
                if validated:
                    v = self.validator
                    self.monitor.message(f"step {self.step}: val_loss {summary['val_loss']:.4f} (best {v.best:.4f} "
                                         f"at step {v.best_step})" + (", stopping early" if v.exhausted else ""))
                if reduced.stop:
                    self.stopped = True
                    self.monitor.message(f"stop requested by signal: saved step {self.step}, exiting")
                    break
            else:
                if c.save_at_end and saved_at != self.step:
                    self.save()
            self.checkpointer.wait()  # the last save is in place before the run reports itself done
        finally:
            getattr(batches, "close", lambda: None)()  # the loader's workers leave now, not at garbage collection
            self.monitor.close()
        if self.layout.is_main:  # after W&B's own closing lines
            for line in self.report.end_lines(self.stopped):
                say(line)

    def _train_step(self, batches, num_domains: int):
        start = time.perf_counter()
        set_learning_rate(self.engine, learning_rate(self.step, self.run.optim, self.run.trainer.max_steps))
        stats = StepStats(self.run.model, num_domains, self.device)
        self.guard.reset()
        reduced = None
        for micro in range(self.gas):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            self.guard.watch_batch(micro, batch["inputs"], batch["labels"])
            out = self.engine(**self._model_inputs(batch))
            stats.add(out, batch)
            self.engine.backward(out.loss)
            if micro == self.gas - 1:  # gradients are complete: every rank decides the same way before stepping
                reduced = stats.reduce(self.guard.nonfinite, self.stop.requested, self.checkpointer.failed())
                self.optimizer.veto = reduced.nonfinite
            self.engine.step()
        self.optimizer.veto = False
        if reduced.nonfinite:
            self._name_bad_points()
        summary = {"reduced": reduced, "grad_norm": global_grad_norm(self.engine, self.optimizer)}
        if self.run.model.aux_loss_type == "megatron":
            from ..model.moe_megatron import finish_megatron_step

            summary["megatron_aux"] = finish_megatron_step(self.module.model, self.gas)
        return summary, stats, time.perf_counter() - start

    def _name_bad_points(self) -> None:
        """A skipped step: where this rank's non-finite inputs or targets came from (shard and row)."""
        where = getattr(self.loader, "where", None)
        for micro, row, point in self.guard.bad_points():
            source = where(self.step * self.gas + micro, row, point) if where else "synthetic data"
            print(f"timemoe-train: rank {self.layout.rank}: step {self.step + 1} skipped: non-finite data in "
                  f"micro-batch {micro} row {row}, point {point}: {source}", file=sys.stderr, flush=True)

    def _model_inputs(self, batch: dict) -> dict:
        inputs = {arg: batch[key] for key, arg in _MODEL_INPUTS.items()}
        if self.run.trainer.precision == "bf16":  # the embedding runs in bf16; labels stay fp32 for the loss
            inputs["inputs_BT"] = inputs["inputs_BT"].to(torch.bfloat16)
        return inputs

    def _log(self, summary: dict, elapsed: float) -> None:
        """A logging step's record: the one place the step's statistics and norm are read back to the host."""
        s = {**summary, **summary["reduced"].read()}
        norm = s["grad_norm"]
        s["grad_norm"] = None if norm is None else float(norm)
        flops = train_flops(self.run.model, s["points"], s["square_sum"])
        record = {"step": self.step, "loss": s["loss"], "aux_loss": s["aux_loss"],
                  "lr": learning_rate(self.step - 1, self.run.optim, self.run.trainer.max_steps),
                  "grad_norm": s["grad_norm"], "tokens_per_s": s["points"] / elapsed,
                  "mfu": flops / (elapsed * self.layout.world_size * self.peak) if self.peak else None,
                  "step_time_s": elapsed, "skipped": s["reduced"].nonfinite, "skipped_total": self.guard.skipped_total}
        if "val_loss" in s:
            record["val_loss"] = s["val_loss"]
        for h, value in zip(self.run.model.horizon_lengths, s["head_losses"]):
            record[f"head_loss/h{h}"] = value
        for name, value in s.get("megatron_aux", {}).items():
            record[f"megatron/{name}"] = value
        if "megatron_aux" in s:  # megatron's balancing replaced the Time-MoE aux loss
            record["aux_loss"] = s["megatron_aux"].get("load_balancing_loss")
        record.update(expert_load_metrics(s["load_LE"]))
        self.report.final_loss = s["loss"]
        self.monitor.log(record)

    def _log_heatmaps(self, domain_load) -> None:
        load_DLE = reduce_domain_load(domain_load)
        if self.layout.is_main:
            seen = [d for d in range(len(self.domain_names)) if load_DLE[d].sum() > 0]
            if seen:
                figure = domain_heatmaps(load_DLE[seen], [self.domain_names[d] for d in seen],
                                         f"expert share per layer and domain (%), steps to {self.step}")
                self.monitor.log_figure(self.step, "expert_load_by_domain", figure)

    def close(self, finished: bool = True) -> None:
        """Tear down everything process-wide this run set up (signal handlers, megatron's and DeepSpeed's groups,
        the default process group), so that the next job of a multirun starts clean. `finished`: every rank got
        here after a complete run (a barrier first); after an error it only tears down."""
        from ..parallel import destroy_parallel

        if finished and dist.is_initialized():
            dist.barrier()
        self.stop.restore()
        _reset_deepspeed_groups()
        destroy_parallel()


def _reset_deepspeed_groups() -> None:
    """DeepSpeed keeps the expert and data-parallel groups it created in module globals and has no reset of its
    own; left in place they name groups of a destroyed process group ("Group ... is not registered")."""
    from deepspeed.utils import groups

    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
        setattr(groups, name, None)
