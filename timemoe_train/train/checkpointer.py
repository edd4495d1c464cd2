"""Checkpoints that appear only when complete and verified, resume at any layout, and never unpickle code.

The file format and its names are `timemoe_train.checkpoint`'s. A save writes every file through a digest (size +
sha256 as the bytes pass, fsynced) into `.tmp-step…`; rank 0 writes the manifest of all ranks' files, renames the
directory into place, then moves `latest` and the `lineage` list. `kill -9` at any moment leaves the previous or
the new checkpoint visible, never a partial one. Resuming verifies the checkpoint `latest` names against its
manifest and falls back through the lineage, newest written first, with a warning naming the bad file
(`timemoe_train.checkpoint.resume`); if none verifies, it stops with an error and writes nothing.

Each rank writes only what it owns (`engine_state`): its ZeRO partition of the fp32 weights and moments, its own
experts'. With `checkpoint.async_save` (the default) the step loop waits only while that share is copied to host
memory (DeepSpeed's own files included); the writing, hashing, manifest and the move into place run in a
background thread, over a process group of their own (gloo), while training goes on. The next save, a stop signal
and the end of training wait for it. The host copy is this rank's share, each storage once (`HostCopies`), plus
DeepSpeed's module file on data-parallel rank 0; while the elastic file is written DCP holds its own copy of each
chunk until the file is closed.

Same layout (world size, EP size, ZeRO stage, precision, MoE implementation) loads DeepSpeed's own files, the fast
path; any other layout loads the elastic part (`elastic/`, see `timemoe_train.checkpoint.elastic` for why DCP).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import (BEST, CONFIG, CONSOLIDATED, ELASTIC, LATEST, LINEAGE, META, OLD_PREFIX, TMP_PREFIX,
                          CheckpointError, DigestWriter, elastic, lineage, load_checkpoint_file, read_meta, tag_for,
                          trainer_state_file)
from ..checkpoint.digests import fsync_dir, write_manifest
from .engine_state import engine_state, load_engine_state

# DeepSpeed 0.19.8 hands its checkpoint engine fresh copies of everything (`clone_tensors_for_torch_save`) except
# the ZeRO partition files, which reference the live optimizer state: the fp32 partitions and Adam's moments, the
# very tensors the elastic part's ranges are views of.
_LIVE_FILES = "zero_pp_rank_"


class HostCopies:
    """Copies of live tensors in host memory for a background write, each storage copied once: a view of a tensor
    already copied (the elastic part's ranges of the ZeRO partitions DeepSpeed's own file holds) is the same view
    of its copy."""

    def __init__(self):
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storage address -> (live, copy)

    def tree(self, obj):
        """`obj` (nested dicts, lists, tuples) with every tensor copied."""
        if isinstance(obj, torch.Tensor):
            copy = obj.detach().to("cpu", copy=True)
            if obj.is_contiguous():
                self._copies[obj.untyped_storage().data_ptr()] = (obj, copy)
            return copy
        if isinstance(obj, dict):
            return type(obj)((k, self.tree(v)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self.tree(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.tree(v) for v in obj)
        return obj

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s copy: a view of an existing copy when `t` lies inside a tensor copied before, else a new one."""
        live, copy = self._copies.get(t.untyped_storage().data_ptr(), (None, None))
        if live is not None and t.is_contiguous():
            start = t.storage_offset() - live.storage_offset()
            if 0 <= start and start + t.numel() <= live.numel():
                return copy.view(-1)[start:start + t.numel()].view(t.shape)
        return t.detach().to("cpu", copy=True)


def run_dir_checkpoint_engine(root: Path, write):
    """DeepSpeed's checkpoint engine, reading through `load_checkpoint_file` and handing each file to
    `write(obj, path)` (the Checkpointer's: now, or staged for the background)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class RunDirCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path):
            write(state_dict, Path(path))

        def load(self, path, map_location=None):
            return load_checkpoint_file(path, root, map_location or "cpu")

    return RunDirCheckpointEngine(None)


def save_file(obj, path: Path, records: dict) -> None:
    """torch.save through DigestWriter (torch's zip format: the legacy one writes storages past a file object,
    straight to its descriptor)."""
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
        self._files: list[tuple[Path, object]] = []  # the checkpoint being saved: its files staged (async_save)
        self._records: dict = {}  # the digests of the files this rank wrote into it
        self._copies = HostCopies()
        self._pending: Future | None = None
        # The background writes' own process group (sync saves use the default one). Made now, a collective over
        # torchrun's store: at the first save the store may be gone (a stop request after the agent died).
        self._group = dist.new_group(backend="gloo") if cfg.async_save else None
        engine.checkpoint_engine = run_dir_checkpoint_engine(self.root, self._add_file)

    # --- reading -------------------------------------------------------------------------------------------
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
    def _add_file(self, obj, path: Path, live: bool = False) -> None:
        """A file of the checkpoint being saved: written now, or (async_save) its copy in host memory queued.
        `live`: `obj` holds tensors that training goes on changing."""
        if not self.cfg.async_save:
            save_file(obj, path, self._records)
            return
        if live or path.name.startswith(_LIVE_FILES):
            obj = self._copies.tree(obj)
        self._files.append((path, obj))

    def save(self, step: int, trainer_state: dict, meta: dict, config_yaml: str, best: bool = False) -> Path:
        """Collective. Returns once this rank's share is in host memory (async_save) or on disk; the checkpoint
        becomes `latest` (and `best` with `best`) when every rank's files are durable (`wait`)."""
        self.wait()
        tag, tmp = tag_for(step), TMP_PREFIX + tag_for(step)
        tmp_dir = self.root / tmp
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        dist.barrier()
        self._files, self._records, self._copies = [], {}, HostCopies()
        entries = None
        if not self.engine.zero_optimization_partition_weights():
            lay = self.layout
            entries = engine_state(self.engine, self.module.model, lay.ep_rank, lay.ep_size)
        self.engine.save_checkpoint(str(self.root), tag=tmp, save_latest=False)  # into self._files
        if entries is None:
            self.engine.save_16bit_model(str(tmp_dir), CONSOLIDATED)
        elif self.cfg.async_save:
            entries = {key: chunks.staged(self._copies.view) for key, chunks in entries.items()}
        tmp_dir.mkdir(parents=True, exist_ok=True)  # ranks that wrote no DeepSpeed file
        self._add_file({**trainer_state, "rng": rng_state()}, tmp_dir / trainer_state_file(self.rank), live=True)
        texts = {META: json.dumps({**meta, "step": step}, indent=2), CONFIG: config_yaml} if self.rank == 0 else {}
        job = (tmp_dir, tag, self._files, self._records, entries, texts, best)
        self._files, self._records, self._copies = [], {}, HostCopies()
        if self.cfg.async_save:
            self._pending = _in_background(self._write, *job)
        else:
            self._write(*job)
        return self.root / tag

    def _write(self, tmp_dir: Path, tag: str, files: list, records: dict, entries: dict | None, texts: dict,
               best: bool) -> None:
        """Every rank writes its (staged) files; when all are on disk, fsynced, rank 0 writes the manifest and moves
        the checkpoint into place. Collectives only over the saves' own group: training may go on meanwhile."""
        while files:  # each staged file's memory goes as soon as it is written
            path, obj = files.pop(0)
            save_file(obj, path, records)
            del obj
        if entries is not None:
            elastic.save(entries, tmp_dir / ELASTIC, records, self._group)
            entries.clear()
        for name, text in texts.items():
            with DigestWriter(tmp_dir / name, records) as f:
                f.write(text.encode())
        every_rank = [None] * self.world_size
        dist.all_gather_object(every_rank, records, group=self._group)  # every rank's files are on disk, fsynced
        if self.rank == 0:
            write_manifest(tmp_dir, {k: v for each in every_rank for k, v in each.items()})
            self._publish(tmp_dir, tag)
            if best:
                _write_atomically(self.root / BEST, tag)
        dist.barrier(group=self._group)

    def wait(self) -> None:
        """Until the save in flight (if any) is in place on every rank; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _publish(self, tmp_dir: Path, tag: str) -> None:
        """Move the complete checkpoint into place, point `latest` and the lineage at it, then prune the lineage
        to its newest `keep_last` (and the best by validation, which stays in the lineage until another is best).
        A re-save of a step (after falling back past a damaged one) sets the old copy aside until the new one is
        in place; a crash in between leaves one of them (`repair_interrupted_saves`)."""
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


def _in_background(fn, *args) -> Future:
    """`fn(*args)` in a daemon thread: a process that dies or exits on an error does not wait for it (its
    checkpoint then stays an incomplete `.tmp-` directory, which the next start removes)."""
    future = Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed to whoever waits
            future.set_exception(e)

    threading.Thread(target=run, name="checkpoint-write", daemon=True).start()
    return future


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
