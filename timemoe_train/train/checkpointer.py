"""Checkpoints that appear only when complete and verified, resume at any layout, and never unpickle code.

The file format and its names are `timemoe_train.checkpoint`'s. A save writes every file through a digest (size +
sha256 as the bytes pass, fsynced) into `.tmp-step…`; rank 0 writes the manifest of all ranks' files, renames the
directory into place, then moves `latest` and the `lineage` list. `kill -9` at any moment leaves the previous or
the new checkpoint visible, never a partial one. Resuming verifies the checkpoint `latest` names against its
manifest and falls back through the lineage, newest written first, with a warning naming the bad file
(`timemoe_train.checkpoint.resume`); if none verifies, it stops with an error and writes nothing.

Same layout (world size, EP size, ZeRO stage, precision, MoE implementation) loads DeepSpeed's own files, the fast
path; any other layout loads the elastic part (`elastic/`, see `timemoe_train.checkpoint.elastic` for why DCP).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import (BEST, CONFIG, CONSOLIDATED, ELASTIC, LATEST, LINEAGE, META, TMP_PREFIX, CheckpointError,
                          DigestWriter, elastic, lineage, load_checkpoint_file, read_meta, tag_for, trainer_state_file)
from ..checkpoint.digests import fsync_dir, write_manifest
from .engine_state import engine_state, load_engine_state

# A checkpoint being replaced by a re-save of its step, kept under this name until the new copy is in place.
OLD_PREFIX = ".old-"


def run_dir_checkpoint_engine(root: Path, records: dict):
    """DeepSpeed's checkpoint engine, reading through `load_checkpoint_file` and writing through DigestWriter
    (torch's zip format: the legacy one writes storages past a file object, straight to its descriptor)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class RunDirCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path):
            save_file(state_dict, path, records)

        def load(self, path, map_location=None):
            return load_checkpoint_file(path, root, map_location or "cpu")

    return RunDirCheckpointEngine(None)


def save_file(obj, path: Path, records: dict) -> None:
    with DigestWriter(path, records) as f:
        torch.save(obj, f)


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
        from ..parallel import current_layout

        self.cfg, self.engine, self.module = cfg, engine, module
        self.rank, self.world_size = rank, world_size
        self.layout = current_layout()
        self.root = Path(cfg.dir).resolve()
        self.records: dict = {}  # digests of the files this rank wrote into the checkpoint being saved
        engine.checkpoint_engine = run_dir_checkpoint_engine(self.root, self.records)

    # --- reading -------------------------------------------------------------------------------------------
    def resumable_tag(self, verified: str | None) -> str | None:
        """Rank 0's `resume_point` (verified before the engine started), for every rank."""
        answer = [verified]
        dist.broadcast_object_list(answer, src=0)
        return answer[0]

    def load(self, tag: str, layout: dict, seed: int) -> dict:
        """Restore engine (weights, optimizer) and RNG from `tag`; returns the trainer state. `layout` is this
        run's (`world_size`, `ep_size`, `zero_stage` …): the one written down in meta.json picks the path."""
        tag_dir = self.root / tag
        meta = read_meta(tag_dir)
        written = {key: meta.get(key) for key in layout}
        if written == layout:
            loaded, _ = self.engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                                    custom_load_fn=self.module.load_model_state)
            if loaded is None:  # DeepSpeed's way of saying it found nothing to load (it only logs a warning)
                raise CheckpointError(f"{tag_dir}: DeepSpeed found no checkpoint of its own to load there")
            state = load_checkpoint_file(tag_dir / trainer_state_file(self.rank), self.root)
            set_rng_state(state["rng"])
            return state
        if 3 in (written.get("zero_stage"), layout.get("zero_stage")) or not (tag_dir / ELASTIC).is_dir():
            changed = ", ".join(f"{k}={written[k]} -> {layout[k]}" for k in layout if written[k] != layout[k])
            raise CheckpointError(
                f"{tag_dir}: written under another layout ({changed}) and holds no elastic part (ZeRO-3 writes "
                "none); resume with the layout that wrote it, or export it (timemoe-export) and start a new run "
                "with trainer.init_from_hf")
        lay = self.layout
        load_engine_state(self.engine, self.module.model, lay.ep_rank, lay.ep_size,
                          lambda entries: elastic.load(entries, tag_dir / ELASTIC))
        state = load_checkpoint_file(tag_dir / trainer_state_file(0), self.root)  # step, data, guard: global
        self.engine.global_steps = state["step"]
        # Per-rank RNG streams do not carry over to another rank count: reseed from (seed, rank, step).
        torch.manual_seed(seed * 7919 + lay.rank + 1_000_003 * state["step"])
        return state

    # --- writing -------------------------------------------------------------------------------------------
    def remove_incomplete(self) -> None:
        """Left-overs of a save interrupted by a crash (rank 0, before training starts). A checkpoint set aside for
        its re-save goes back in place if the new copy never arrived."""
        if self.rank == 0 and self.root.is_dir():
            for old in self.root.glob(OLD_PREFIX + "*"):
                tag = self.root / old.name[len(OLD_PREFIX):]
                if tag.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(old, tag)
            for path in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, trainer_state: dict, meta: dict, config_yaml: str) -> Path:
        tag, tmp = tag_for(step), TMP_PREFIX + tag_for(step)
        tmp_dir = self.root / tmp
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        dist.barrier()
        self.records.clear()
        self.engine.save_checkpoint(str(self.root), tag=tmp, save_latest=False)
        if self.engine.zero_optimization_partition_weights():
            self.engine.save_16bit_model(str(tmp_dir), CONSOLIDATED)
        else:
            lay = self.layout
            elastic.save(engine_state(self.engine, self.module.model, lay.ep_rank, lay.ep_size),
                         tmp_dir / ELASTIC, self.records)
        tmp_dir.mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file
        save_file({**trainer_state, "rng": rng_state()}, tmp_dir / trainer_state_file(self.rank), self.records)
        if self.rank == 0:
            for name, text in ((META, json.dumps({**meta, "step": step}, indent=2)), (CONFIG, config_yaml)):
                with DigestWriter(tmp_dir / name, self.records) as f:
                    f.write(text.encode())
        every_rank = [None] * self.world_size
        dist.all_gather_object(every_rank, dict(self.records))  # every rank's files are on disk, fsynced
        if self.rank == 0:
            write_manifest(tmp_dir, {k: v for records in every_rank for k, v in records.items()})
            self._publish(tmp_dir, tag)
        dist.barrier()
        return self.root / tag

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            _write_atomically(self.root / BEST, tag)

    def _publish(self, tmp_dir: Path, tag: str) -> None:
        """Move the complete checkpoint into place, point `latest` and the lineage at it, then prune the lineage
        to its newest `keep_last` (and the best by validation, which stays in the lineage until another is best).
        A re-save of a step (after falling back past a damaged one) sets the old copy aside until the new one is
        in place; a crash in between leaves one of them (`remove_incomplete`)."""
        old = self.root / (OLD_PREFIX + tag)
        if (self.root / tag).exists():
            os.replace(self.root / tag, old)
        os.replace(tmp_dir, self.root / tag)
        fsync_dir(self.root)
        _write_atomically(self.root / LATEST, tag)
        tags = [t for t in lineage(self.root) if t != tag] + [tag]
        best = (self.root / BEST).read_text().strip() if (self.root / BEST).is_file() else None
        kept = [t for i, t in enumerate(tags) if i >= len(tags) - self.cfg.keep_last or t == best]
        _write_atomically(self.root / LINEAGE, "".join(t + "\n" for t in kept))
        for gone in [old, *(self.root / t for t in tags if t not in kept)]:
            shutil.rmtree(gone, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
