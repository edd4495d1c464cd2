"""Checkpoints that appear only when complete, resume exactly, and never unpickle arbitrary code.

Layout of `checkpoint.dir`:
    step00000100/        DeepSpeed's files (shared weights, ZeRO shards, one file per expert) plus
        trainer_state_rank00000.pt   per rank: step, data-loader position, RNG states, guard counters
        meta.json                    model config, parallel layout, expert-name map (for `timemoe-export`)
        consolidated_model_states.pt ZeRO-3 only: the gathered weights (its shards alone need DeepSpeed to read)
        config.yaml                  the resolved run config (secrets removed)
    latest               the tag of the newest complete checkpoint (DeepSpeed's format)

A save writes into `.tmp-step…`, renames it once every rank has finished, then replaces `latest` atomically.
`kill -9` at any moment leaves either the previous or the new checkpoint visible, never a partial one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..export.hf_layout import CheckpointError

LATEST = "latest"
TMP_PREFIX = ".tmp-"
META = "meta.json"
CONFIG = "config.yaml"
CONSOLIDATED = "consolidated_model_states.pt"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _engine_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its own files besides tensors, allowed for weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str | Path, root: str | Path, map_location="cpu", engine_classes: bool = True):
    """torch.load restricted to files inside `root` (the run's checkpoint directory), with weights_only=True:
    tensors and containers only, plus (`engine_classes`) DeepSpeed's own bookkeeping classes."""
    path, root = Path(path).resolve(), Path(root).resolve()
    if root not in path.parents:
        raise PermissionError(f"{path}: refusing to unpickle a file outside the checkpoint directory {root}")
    try:
        with torch.serialization.safe_globals(_engine_globals() if engine_classes else []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        raise CheckpointError(f"{path}: refused: it pickles {unsafe}, and only tensors and DeepSpeed's bookkeeping "
                              f"are loaded (weights_only=True): {str(e).splitlines()[0]}") from None


def run_dir_checkpoint_engine(root: Path):
    """DeepSpeed's checkpoint engine, reading through `load_checkpoint_file` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class RunDirCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return load_checkpoint_file(path, root, map_location or "cpu")

    return RunDirCheckpointEngine(None)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg, engine, module, rank: int, world_size: int):
        self.cfg, self.engine, self.module = cfg, engine, module
        self.rank, self.world_size = rank, world_size
        self.root = Path(cfg.dir).resolve()
        engine.checkpoint_engine = run_dir_checkpoint_engine(self.root)

    # --- reading -------------------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"{path} names {tag!r}, which is not a directory of {self.root}")
        return tag

    def load(self, tag: str, layout: dict) -> dict:
        """Restore engine (weights, optimizer) and RNG from `tag`, which must have been written under the same
        `layout` (world_size, ep_size, zero_stage …); returns this rank's trainer state."""
        meta = json.loads((self.root / tag / META).read_text())
        for key, ours in layout.items():
            if meta.get(key) != ours:
                raise RuntimeError(
                    f"{self.root / tag}: written with {key}={meta.get(key)}, this run has {key}={ours}; resume with "
                    "the same layout, or export it (timemoe-export) and start a new run with trainer.init_from_hf")
        self.engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                    custom_load_fn=self.module.load_model_state)
        state = load_checkpoint_file(self.root / tag / f"trainer_state_rank{self.rank:05d}.pt", self.root)
        set_rng_state(state["rng"])
        return state

    # --- writing -------------------------------------------------------------------------------------------
    def remove_incomplete(self) -> None:
        """Left-overs of a save interrupted by a crash (rank 0, before training starts)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, trainer_state: dict, meta: dict, config_yaml: str) -> Path:
        tag, tmp = tag_for(step), TMP_PREFIX + tag_for(step)
        if self.rank == 0:
            shutil.rmtree(self.root / tmp, ignore_errors=True)
        dist.barrier()
        self.engine.save_checkpoint(str(self.root), tag=tmp, save_latest=False)
        if self.engine.zero_optimization_partition_weights():
            self.engine.save_16bit_model(str(self.root / tmp), CONSOLIDATED)
        (self.root / tmp).mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file
        torch.save({**trainer_state, "rng": rng_state()},
                   self.root / tmp / f"trainer_state_rank{self.rank:05d}.pt")
        if self.rank == 0:
            (self.root / tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
            (self.root / tmp / CONFIG).write_text(config_yaml)
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            shutil.rmtree(self.root / tag, ignore_errors=True)  # a re-save of the same step after a resume
            os.replace(self.root / tmp, self.root / tag)
            _write_atomically(self.root / LATEST, tag)
            self._prune(keep=tag)
        dist.barrier()
        return self.root / tag

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.cfg.keep_last)]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
