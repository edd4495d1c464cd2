"""Training-run dataclasses (one per Hydra group) and the checks that run before any process-group work.

Hydra instantiates each group with `_target_`; `RunConfig` gathers them and `validate(world_size)` rejects a
bad combination with one message naming the key and its value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from ..model.config import TimeMoeConfig

PRECISIONS = ("fp32", "bf16")  # and "auto", resolved by TrainerConfig
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = (None, "online", "offline", "disabled")


class TrainConfigError(ValueError):
    """A training-config value that cannot work; the message names the key and the value."""


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    # DeepSpeed ZeRO stage. 0-2 work with expert parallelism; 3 (parameter partitioning) only without it. None: 0
    # for an fp32 run on one process (ZeRO would partition nothing, yet copy every gradient into its flat buffers
    # and the weights back: ~15% of a base step on CPU), else 1 (resolved by `RunConfig.validate`).
    zero_stage: int | None = None
    offload_optimizer: bool = False  # optimizer state and step on the CPU (DeepSpeed's CPU Adam)
    offload_params: bool = False  # ZeRO-3 only


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Biases and RMSNorm gains (1-D tensors) are not decayed.
    decay_1d: bool = False
    warmup_steps: int = 100
    # Steps of the cosine from lr to min_lr after warmup; None: until trainer.max_steps.
    decay_steps: int | None = None
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    global_batch_size: int = 64  # windows per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # windows per forward pass on one rank
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 when the run is on CUDA, fp32 on the CPU (resolved at construction)
    # HF-layout directory (config.json + model.safetensors) to start from instead of a random init.
    init_from_hf: str | None = None
    # Consecutive skipped (non-finite) steps that stop the run.
    max_bad_steps: int = 5
    # Peak FLOP/s of one device for the MFU estimate; None: looked up for known GPUs, else MFU is not reported.
    peak_flops_per_device: float | None = None
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    # Validation (train/validation.py): a prepared corpus of held-out windows, scored every val_interval steps (0:
    # never) on its first val_batches micro-batches per rank; the lowest val_loss's checkpoint is kept as `best`
    # (never pruned, what timemoe-export --tag best exports) and the run stops after `patience` validations
    # without a new best (0: never stops early).
    val_path: str | None = None
    val_interval: int = 0
    val_batches: int = 8
    patience: int = 0

    def __post_init__(self):
        # The one place "auto" becomes a precision: everything downstream (engine, checkpoint meta) sees it.
        if self.precision == "auto":
            self.precision = "bf16" if self.uses_cuda() else "fp32"

    def uses_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # train.yaml: ${run.dir}/checkpoints
    interval: int = 500  # steps between checkpoints (0: only at the end and on preemption)
    keep_last: int = 3
    # True: continue from `dir/latest`. False: move the previous lineage aside (run dir/previous-<time>/), start over.
    resume: bool = True
    save_at_end: bool = True
    # True: the step loop waits only while this rank's share is copied to host memory; writing, hashing and the
    # move into place run in the background. False: it waits until the checkpoint is in place, and needs no host
    # memory for the copy.
    async_save: bool = True
    # Seconds a rank waits for the others in a save's collectives, and for its own write when it stops: a rank whose
    # write hangs stops every rank within about twice this (one whose write fails says so at once). Every rank then
    # stops in the same step with one line.
    write_timeout_s: float = 600.0


@dataclass
class WandbConfig:
    """Each key set here overrides W&B's environment (WANDB_MODE, WANDB_PROJECT, ...); None leaves it to that
    environment, and where that is silent too: offline, project timemoe-train."""

    mode: str | None = None  # "online", "offline", "disabled" or None
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.tags = list(self.tags)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    interval: int = 1  # steps between metrics.jsonl / W&B records (and updates of the progress bar)
    # Steps between per-domain expert-load heatmaps (accumulated over that window); 0 disables them.
    heatmap_interval: int = 100
    progress: bool = True  # a bar on a terminal, plain lines in a log file
    # Steps between those plain lines (a multiple of `interval`); the last step always has one.
    progress_interval: int = 10


def packs_rows(data_cfg) -> bool:
    """Whether the data group may put several pieces in one row (the synthetic source always can)."""
    return getattr(data_cfg, "packing", True)


def _type_name(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) else str(hint)


def typed_values(cls, values: dict, prefix: str) -> dict:
    """A group's values (a resolved Hydra container, `_target_` kept) with every field of the dataclass `cls`
    checked and converted by OmegaConf's structured-config validation: Hydra's instantiate alone would fill the
    dataclass whatever the types (`data.packing=maybe`, `trainer.max_steps="5"`). A value that does not fit its
    field's annotation raises one line naming the key, the value and the type."""
    if not dataclasses.is_dataclass(cls):
        return values
    hints = typing.get_type_hints(cls)
    nested = {k for k in values if dataclasses.is_dataclass(hints.get(k)) and isinstance(values[k], dict)}
    flat = {k: v for k, v in values.items() if k != "_target_" and k not in nested}
    try:
        converted = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(cls), flat))
    except ConfigKeyError as e:  # a key added with `+group.key=...` that the dataclass does not have
        raise TrainConfigError(no_such_key(f"{prefix}.{e.key}", [f.name for f in dataclasses.fields(cls)])) from None
    except ValidationError as e:
        field = re.match(r"[^.\[]+", e.full_key or "").group(0)
        raise TrainConfigError(f"{prefix}.{field}={flat.get(field)!r}: must be {_type_name(hints[field])}") from None
    out = {**values, **{k: converted[k] for k in flat}}
    for k in nested:
        out[k] = typed_values(hints[k], values[k], f"{prefix}.{k}")
    return out


def no_such_key(full_key: str, keys) -> str:
    """One line for a key its group does not have: the group's keys closest to it (difflib), else all of them.
    (Hydra's own answer, `+key=...`, adds the key, which the group's dataclass then refuses.)"""
    parent, _, name = full_key.rpartition(".")
    keys = [k for k in keys if not k.startswith("_") and k != "hydra"]
    where = parent or "the config"
    close = [f"{parent}.{k}".lstrip(".") for k in difflib.get_close_matches(name, keys, n=3)]
    if close:
        return f"{full_key}: no such key in {where}; did you mean {' or '.join(close)}?"
    return f"{full_key}: no such key in {where}; its keys: {', '.join(keys)}"


def one_line(e: BaseException) -> str:
    """OmegaConf and Hydra messages run over several lines (the key, the object type, a hint): the ones that say
    something, joined."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type=")))


def omegaconf_message(e: OmegaConfBaseException, where: str) -> str:
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key}: no value given; add {e.full_key}=... to the command"
    return f"{e.full_key or where}: {one_line(e)}"


def run_config(cfg: DictConfig) -> RunConfig:
    """Instantiate every group's dataclass (`_target_`), turning bad values into one clear message."""
    groups = {}
    for name in ("model", "data", "parallel", "optim", "trainer", "checkpoint", "logger"):
        try:
            values = OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=True)
            target = get_class(values["_target_"])
            groups[name] = instantiate(typed_values(target, values, name), _convert_="all")
        except InstantiationException as e:
            cause = e.__cause__ or e
            raise TrainConfigError(f"{name}: {cause}") from None
        except OmegaConfBaseException as e:  # e.g. data.path=??? (mandatory and not given)
            raise TrainConfigError(omegaconf_message(e, name)) from None
    return RunConfig(**groups)


def checked_run_config(cfg: DictConfig) -> RunConfig:
    """`run_config`, validated for the launch's process count: every error the config alone shows."""
    run = run_config(cfg)
    run.validate(int(os.environ.get("WORLD_SIZE", "1")))
    return run


@dataclass
class RunConfig:
    model: TimeMoeConfig
    data: Any
    parallel: ParallelConfig
    optim: OptimConfig
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    logger: LoggerConfig

    def __post_init__(self):
        # Rows that hold one piece each need no document mask at all: plain causal attention (flash on GPUs).
        if self.model.attn_impl == "auto" and not packs_rows(self.data):
            self.model.attn_impl = "causal"

    def validate(self, world_size: int) -> None:
        """Everything that can be checked from the config and the process count alone."""
        from ..parallel import ParallelLayoutError, validate_layout

        p, t, o, c, lg, m = self.parallel, self.trainer, self.optim, self.checkpoint, self.logger, self.model
        if p.zero_stage is None:  # the one place it is resolved: engine, checkpoint meta and report see the stage
            p.zero_stage = 0 if world_size == 1 and t.precision == "fp32" else 1
        try:
            validate_layout(world_size, p.expert_parallel_size, None if m.use_dense else m.num_experts)
        except ParallelLayoutError as e:  # its message starts with the offending key of the parallel group
            raise TrainConfigError(f"parallel.{e}") from None
        ep = p.expert_parallel_size
        per_step = max(1, t.micro_batch_size) * world_size  # every process is a data-parallel replica
        window = getattr(self.data, "max_length", None)
        data_path = getattr(self.data, "path", None)
        rules = [  # (broken, key, value, why), checked in order
            (ep > 1 and (m.moe_impl != "megatron" or m.use_dense), "parallel.expert_parallel_size", ep,
             "expert parallelism runs megatron's MoE layer: use parallel=expert (model.moe_impl=megatron, "
             "model.use_dense=false)"),
            (p.zero_stage not in ZERO_STAGES, "parallel.zero_stage", p.zero_stage, f"choose one of {ZERO_STAGES}"),
            (p.zero_stage == 3 and ep > 1, "parallel.zero_stage", p.zero_stage,
             "ZeRO-3 partitions every parameter over all ranks, experts included; with expert_parallel_size > 1 "
             "use stage 0, 1 or 2"),
            (p.offload_optimizer and ep > 1, "parallel.offload_optimizer", True,
             "CPU offload is supported without expert parallelism only"),
            (p.offload_optimizer and p.zero_stage == 0, "parallel.offload_optimizer", True, "needs ZeRO stage >= 1"),
            (p.offload_params and p.zero_stage != 3, "parallel.offload_params", True, "needs ZeRO stage 3"),
            *((getattr(t, k) < 1, f"trainer.{k}", getattr(t, k), "must be a positive integer")
              for k in ("max_steps", "global_batch_size", "micro_batch_size", "max_bad_steps")),
            (t.global_batch_size % per_step, "trainer.global_batch_size", t.global_batch_size,
             f"must be a multiple of trainer.micro_batch_size ({t.micro_batch_size}) x data-parallel size "
             f"({world_size}) = {per_step}"),
            (t.precision not in PRECISIONS, "trainer.precision", t.precision, f"choose auto or one of {PRECISIONS}"),
            (t.precision == "bf16" and p.zero_stage == 0, "trainer.precision", t.precision,
             "bf16 needs parallel.zero_stage >= 1: at stage 0 DeepSpeed can only accumulate and all-reduce the "
             "gradients in bf16"),
            (m.attn_impl == "causal" and packs_rows(self.data), "model.attn_impl", m.attn_impl,
             "attends across the pieces of a packed row; with data.packing=true use auto, varlen or flex"),
            (t.device not in ("auto", "cpu", "cuda"), "trainer.device", t.device, "choose auto, cpu or cuda"),
            (t.val_interval < 0, "trainer.val_interval", t.val_interval, "must be >= 0 (0: no validation)"),
            (t.val_interval > 0 and not (t.val_path and Path(t.val_path).is_dir()), "trainer.val_path", t.val_path,
             "trainer.val_interval > 0 needs the directory of a prepared validation corpus"),
            (t.init_from_hf is not None and not Path(t.init_from_hf).is_dir(), "trainer.init_from_hf",
             t.init_from_hf, "no such directory (an HF-layout folder: config.json and model.safetensors)"),
            (t.val_batches < 1, "trainer.val_batches", t.val_batches, "must be a positive integer"),
            (t.patience < 0, "trainer.patience", t.patience, "must be >= 0 (0: no early stopping)"),
            (t.patience > 0 and t.val_interval == 0, "trainer.patience", t.patience,
             "early stopping needs validation: set trainer.val_interval"),
            (data_path is not None and not Path(data_path).is_dir(), "data.path", data_path,
             "no such directory (give the folder timemoe-prep wrote, the one holding manifest.json)"),
            (window is not None and window > m.max_position_embeddings, "data.max_length", window,
             f"exceeds model.max_position_embeddings={m.max_position_embeddings}"),
            (not o.lr > 0, "optim.lr", o.lr, "must be > 0"),
            (not 0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"need 0 <= optim.min_lr <= optim.lr ({o.lr})"),
            (o.warmup_steps < 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0"),
            (o.decay_steps is not None and o.decay_steps < 0, "optim.decay_steps", o.decay_steps, "must be >= 0"),
            (o.clip_grad < 0, "optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)"),
            (c.interval < 0, "checkpoint.interval", c.interval, "must be >= 0 (0: only at the end)"),
            (c.keep_last < 1, "checkpoint.keep_last", c.keep_last, "must be >= 1"),
            (not c.write_timeout_s > 0, "checkpoint.write_timeout_s", c.write_timeout_s, "must be > 0 (seconds)"),
            (lg.wandb.mode not in WANDB_MODES, "logger.wandb.mode", lg.wandb.mode, f"choose one of {WANDB_MODES}"),
            (lg.interval < 1, "logger.interval", lg.interval, "must be >= 1"),
            (lg.progress_interval < 1 or lg.progress_interval % lg.interval, "logger.progress_interval",
             lg.progress_interval, f"must be a positive multiple of logger.interval ({lg.interval})"),
            (lg.heatmap_interval < 0, "logger.heatmap_interval", lg.heatmap_interval, "must be >= 0 (0: off)"),
        ]
        for broken, key, value, why in rules:
            if broken:
                raise TrainConfigError(f"{key}={value!r}: {why}")

    def gradient_accumulation_steps(self, world_size: int) -> int:
        return self.trainer.global_batch_size // (self.trainer.micro_batch_size * world_size)

