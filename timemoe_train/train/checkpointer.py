"""Checkpoints that appear only when complete and verified, resume at any layout, and never unpickle code.

The file format and its names are `timemoe_train.checkpoint`'s. A save writes every file through a digest (size +
sha256 as the bytes pass, fsynced) into `.tmp-step…`; rank 0 writes the manifest of all ranks' files, renames the
directory into place, then moves `latest` and the `lineage` list. `kill -9` at any moment leaves the previous or
the new checkpoint visible, never a partial one. Resuming verifies the checkpoint `latest` names against its
manifest and falls back through the lineage, newest written first, with a warning naming the bad file
(`timemoe_train.checkpoint.resume`); if none verifies, it stops with an error and writes nothing.

Each rank writes only what it owns (`engine_state`): its ZeRO partition of the fp32 weights and moments, its own
experts'. With `checkpoint.async_save` (the default) the step loop waits only while that share is copied to host
memory: every tensor of every file, DeepSpeed's own included (`HostCopies`; DeepSpeed hands over live tensors: the
module's weights, at ZeRO-0 Adam's moments, at ZeRO 1/2 its partitions), so that the steps after `save` returns
change nothing the background write reads. The writing, hashing, manifest and the move into place run in a
background thread, over a process group of their own (gloo, with `checkpoint.write_timeout_s`), while training goes
on. The next save, a stop signal and the end of training wait for it.

A write that fails on one rank fails the save on every rank: each rank catches its own failure and says so in the
save group's collectives, which then skip the elastic part's (DCP's own collectives: every rank enters them or
none) and the publishing, so `latest` keeps naming the previous checkpoint. The failure reaches every rank's step
loop in the same step (`failed`, carried by the step's all-reduce), and `wait` raises `CheckpointWriteError` there,
the same line on every rank. A rank whose write hangs stops every rank within about twice
`checkpoint.write_timeout_s` (the save group's timeout, then each rank's wait for its own write), not gloo's
default 30 minutes.

Same layout (world size, EP size, ZeRO stage, precision, MoE implementation) loads DeepSpeed's own files, the fast
path; any other layout loads the elastic part (`elastic/`, see `timemoe_train.checkpoint.elastic` for why DCP).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..checkpoint import (BEST, CONFIG, CONSOLIDATED, ELASTIC, LATEST, LINEAGE, META, OLD_PREFIX, TMP_PREFIX,
                          CheckpointError, CheckpointWriteError, DigestWriter, elastic, lineage, load_checkpoint_file,
                          read_meta, tag_for, trainer_state_file)
from ..checkpoint.digests import fsync_dir, write_atomically, write_manifest
from .engine_state import engine_state, load_engine_state


class HostCopies:
    """Copies in host memory of the tensors a background write reads, taken while the step loop waits: each tensor
    copied once, and a view of a tensor already copied (the elastic part's ranges of the parameters and ZeRO
    partitions DeepSpeed's files hold) is the same view of its copy. Device tensors go into pinned memory with
    non-blocking copies, so that they overlap; `ready()` waits for them all at once. Pinned memory comes from torch's
    caching host allocator: the next save reuses the blocks this one frees, instead of pinning afresh."""

    def __init__(self):
        self._copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # storage address -> (live, copy)
        self._device = False

    def tree(self, obj):
        """`obj` (nested dicts, lists, tuples) with every tensor copied, and every other object that is not a plain
        value (DeepSpeed's loss scaler) deep-copied: nothing in it is shared with the live state."""
        if isinstance(obj, torch.Tensor):
            return self._copy(obj, exact=True)
        if isinstance(obj, dict):
            return type(obj)((k, self.tree(v)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self.tree(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self.tree(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        return copy.deepcopy(obj)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s copy: a view of an existing copy when `t` lies inside a tensor copied before, else a new one."""
        return self._copy(t, exact=False)

    def ready(self) -> None:
        """Every copy is complete (the device's copies were only queued)."""
        if self._device:
            torch.cuda.synchronize()
            self._device = False

    def _copy(self, t: torch.Tensor, exact: bool) -> torch.Tensor:
        """A copy of `t`; one already taken when `t` is a tensor copied before, or (not `exact`: a torch file would
        write a view's whole storage) lies inside one."""
        t = t.detach()
        address = t.untyped_storage().data_ptr()
        for live, copied in self._copies.get(address, ()):
            if live.dtype != t.dtype or not t.is_contiguous():
                continue
            start = t.storage_offset() - live.storage_offset()
            if exact and (start, t.shape, t.stride()) == (0, live.shape, live.stride()):
                return copied
            if not exact and 0 <= start and start + t.numel() <= live.numel():
                return copied.view(-1)[start:start + t.numel()].view(t.shape)
        if t.device.type == "cuda":
            copied = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            copied.copy_(t, non_blocking=True)
            self._device = True
        else:
            copied = t.clone(memory_format=torch.contiguous_format)
        if t.is_contiguous():
            self._copies.setdefault(address, []).append((t, copied))
        return copied


@dataclass(frozen=True)
class WriteFailure:
    """What stopped one rank's part of a save: the file it was writing ("" when none) and why. `waited`: this rank
    only waited in vain for the others."""

    rank: int
    tag: str
    path: str
    why: str
    waited: bool = False

    @classmethod
    def of(cls, rank: int, tag: str, records: dict, error: BaseException) -> WriteFailure:
        """The file being written when `error` struck: the one still open in `records` (DigestWriter's)."""
        path = next((p for p, digest in records.items() if digest is None), getattr(error, "filename", None))
        if isinstance(error, OSError) and error.strerror:
            why = f"{error.strerror} (errno {error.errno})"
        else:
            why = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        return cls(rank, tag, str(path or ""), why)


def run_dir_checkpoint_engine(root: Path, write, staged):
    """DeepSpeed's checkpoint engine, reading through `load_checkpoint_file` and handing each file to
    `write(obj, path)` (the Checkpointer's: now, or staged for the background). `staged()`: files are staged in
    host copies of their own, so DeepSpeed need not clone the tensors of some files first (on the device, or to
    pageable memory: a second copy)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class RunDirCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path):
            write(state_dict, Path(path))

        def load(self, path, map_location=None):
            return load_checkpoint_file(path, root, map_location or "cpu")

        def preserves_storage_sharing(self):
            return not staged()

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
        self._in_flight: tuple[str, dict] = ("", {})  # the pending write's tag and records
        # The background writes' own process group (sync saves use the default one). Made now, a collective over
        # torchrun's store: at the first save the store may be gone (a stop request after the agent died). Its
        # timeout bounds how long a rank waits for another whose write hangs (a failing one says so at once).
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.write_timeout_s)) \
            if cfg.async_save else None
        engine.checkpoint_engine = run_dir_checkpoint_engine(self.root, self._add_file, lambda: cfg.async_save)

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
    def _add_file(self, obj, path: Path) -> None:
        """A file of the checkpoint being saved: written now, or (async_save) its copy in host memory queued."""
        if not self.cfg.async_save:
            save_file(obj, path, self._records)
            return
        self._files.append((path, self._copies.tree(obj)))

    def save(self, step: int, trainer_state: dict, meta: dict, config_yaml: str, best: bool = False) -> Path:
        """Collective. Returns once this rank's share is in host memory (async_save) or on disk; the checkpoint
        becomes `latest` (and `best` with `best`) when every rank's files are durable (`wait`). Raises
        CheckpointWriteError (on every rank) when the previous save, or this synchronous one, failed."""
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
        self._add_file({**trainer_state, "rng": rng_state()}, tmp_dir / trainer_state_file(self.rank))
        self._copies.ready()
        texts = {META: json.dumps({**meta, "step": step}, indent=2), CONFIG: config_yaml} if self.rank == 0 else {}
        job = (tmp_dir, tag, self._files, self._records, entries, texts, best)
        self._in_flight = (tag, self._records)
        self._files, self._records, self._copies = [], {}, HostCopies()
        self._pending = Future()
        if self.cfg.async_save:
            threading.Thread(target=_run, args=(self._pending, self._write, job), name="checkpoint-write",
                             daemon=True).start()  # a process that dies or exits does not wait for it
        else:
            _run(self._pending, self._write, job)
            self.wait()
        return self.root / tag

    def _write(self, tmp_dir: Path, tag: str, files: list, records: dict, entries: dict | None, texts: dict,
               best: bool) -> list[WriteFailure]:
        """Every rank writes its (staged) files; when all are on disk, fsynced, rank 0 writes the manifest and moves
        the checkpoint into place. Collectives only over the saves' own group: training may go on meanwhile.
        Returns every rank's failures (the same on each; none: the checkpoint is in place); if there are any, the
        checkpoint was not published and its `.tmp-` directory is gone."""
        failures = self._attempt(tag, records, self._write_files, tmp_dir, files, texts, records)
        if entries is not None:
            failures = self._every_ranks(tag, failures)  # DCP's collectives: entered by every rank or by none
            if not failures:
                failures = self._attempt(tag, records, elastic.save, entries, tmp_dir / ELASTIC, records, self._group)
            entries.clear()
        every_rank = self._gather((failures, records))  # every rank's files are on disk, fsynced
        if every_rank is None:
            failures = self._no_answer(tag)
        else:
            failures = _union(fs for fs, _ in every_rank)
            if not failures:
                if self.rank == 0:
                    failures = self._attempt(tag, {}, self._publish_all, tmp_dir, tag, every_rank, best)
                published = self._gather(failures if self.rank == 0 else None)
                failures = self._no_answer(tag) if published is None else published[0]
        if failures and self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return failures

    def _write_files(self, tmp_dir: Path, files: list, texts: dict, records: dict) -> None:
        while files:  # each staged file's memory goes as soon as it is written
            path, obj = files.pop(0)
            save_file(obj, path, records)
            del obj
        for name, text in texts.items():
            with DigestWriter(tmp_dir / name, records) as f:
                f.write(text.encode())

    def _publish_all(self, tmp_dir: Path, tag: str, every_rank: list, best: bool) -> None:
        write_manifest(tmp_dir, {k: v for _, each in every_rank for k, v in each.items()})
        self._publish(tmp_dir, tag)
        if best:
            write_atomically(self.root / BEST, tag)

    def _attempt(self, tag: str, records: dict, fn, *args) -> list[WriteFailure]:
        """`fn(*args)`; what stopped it on this rank, if anything."""
        try:
            fn(*args)
            return []
        except CheckpointException as e:  # DCP's, on every rank: each failed rank's own error
            if self.rank not in e.failures:
                return []  # another rank's failure: that rank says it
            return [WriteFailure.of(self.rank, tag, records, e.failures[self.rank][0])]
        except Exception as e:  # noqa: BLE001 -- every failure is said in the save group's next collective
            return [WriteFailure.of(self.rank, tag, records, e)]

    def _gather(self, mine) -> list | None:
        """Collective over the save group: every rank's `mine`; None when some rank did not answer within
        checkpoint.write_timeout_s."""
        every_rank = [None] * self.world_size
        try:
            dist.all_gather_object(every_rank, mine, group=self._group)
        except RuntimeError:  # gloo's timeout
            return None
        return every_rank

    def _every_ranks(self, tag: str, failures: list[WriteFailure]) -> list[WriteFailure]:
        every_rank = self._gather(failures)
        return self._no_answer(tag) if every_rank is None else _union(every_rank)

    def _no_answer(self, tag: str) -> list[WriteFailure]:
        return [WriteFailure(self.rank, tag, "", "another rank did not answer within checkpoint.write_timeout_s="
                             f"{self.cfg.write_timeout_s:g} s", waited=True)]

    def failed(self) -> bool:
        """This rank's save in flight has ended and failed (no waiting): every rank learns it from the step's
        all-reduce, and all stop in that step (`wait` raises there)."""
        pending = self._pending
        return pending is not None and pending.done() and (pending.exception() is not None or bool(pending.result()))

    def wait(self) -> None:
        """Collective: until the save in flight (if any) is in place on every rank. Raises CheckpointWriteError, the
        same on every rank, when it failed on any (or a rank's write did not end within checkpoint.write_timeout_s
        of this wait)."""
        pending, self._pending = self._pending, None
        mine = []
        if pending is not None:
            tag, records = self._in_flight
            try:
                mine = pending.result(timeout=self.cfg.write_timeout_s) or []
            except FutureTimeout:
                open_file = next((p for p, digest in list(records.items()) if digest is None), "")
                mine = [WriteFailure(self.rank, tag, open_file, "still being written after checkpoint."
                                     f"write_timeout_s={self.cfg.write_timeout_s:g} s")]
            except Exception as e:  # noqa: BLE001 -- a failure outside the writes themselves
                mine = [WriteFailure.of(self.rank, tag, records, e)]
        every_rank = [mine]
        if self.world_size > 1:
            every_rank = [None] * self.world_size
            dist.all_gather_object(every_rank, mine)
        failures = _union(every_rank)
        if failures:
            raise CheckpointWriteError(self._failure_line(failures))

    def _failure_line(self, failures: list[WriteFailure]) -> str:
        """One line for every rank alike: the first rank that failed by itself (not by waiting for another)."""
        failures = sorted(failures, key=lambda f: f.waited)
        first, others = failures[0], {f.rank for f in failures if not f.waited} - {failures[0].rank}
        latest = self.root / LATEST
        kept = (f"{latest} still names {latest.read_text().strip()}" if latest.is_file()
                else "no checkpoint of this run was complete before it")
        return (f"rank {first.rank} could not write its part of checkpoint {first.tag}: "
                f"{first.path + ': ' if first.path else ''}{first.why}"
                f"{f' (ranks {sorted(others)} failed too)' if others else ''}; the checkpoint was not published, "
                f"{kept}")

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
        write_atomically(self.root / LATEST, tag)
        tags = [t for t in lineage(self.root) if t != tag] + [tag]
        best = (self.root / BEST).read_text().strip() if (self.root / BEST).is_file() else None
        kept = [t for i, t in enumerate(tags) if i >= len(tags) - self.cfg.keep_last or t == best]
        write_atomically(self.root / LINEAGE, "".join(t + "\n" for t in kept))
        for gone in [old, *(self.root / t for t in tags if t not in kept)]:
            shutil.rmtree(gone, ignore_errors=True)


def _union(lists) -> list[WriteFailure]:
    """The failures of several ranks' lists, each once, by rank."""
    return sorted({f for failures in lists for f in failures}, key=lambda f: (f.rank, f.path))


def _run(future: Future, fn, args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 -- handed to whoever waits
        future.set_exception(e)
