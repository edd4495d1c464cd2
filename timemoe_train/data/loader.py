"""The trainer's entry point: this rank's micro-batches, prefetched by worker processes, resumable by index.

Global batch g is rows [g·B, (g+1)·B) of the global stream. Data-parallel rank r takes rows [r·B/dp, (r+1)·B/dp)
of it, in micro-batches of consecutive rows (gradient accumulation steps). Any layout therefore trains on the same
global batches, and a checkpoint only has to remember how many micro-batches were consumed.
"""

from __future__ import annotations

import hashlib
import itertools
import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig
from .errors import DataError
from .corpus import read_manifest
from .plan_cache import load_plan
from .stream import SampleStream

# The signals that ask a run to stop. The trainer handles them; its loader workers must not, because launchers signal
# whole process groups (torchrun each worker's group, SLURM every process of the step, a terminal's Ctrl-C the
# foreground group) and a worker killed by one makes the trainer fail before it can save.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# DataConfig fields that decide the stream; a resumed run must agree on all of them.
_STREAM_FIELDS = ("max_length", "window_mode", "window_stride", "packing", "normalization", "normalization_excludes",
                  "mixture_by", "mixture_weights", "mixture_temperature", "mixture_block", "seed", "holdout_points")
# Fields added after checkpoints were written without them: the value those checkpoints had.
_ADDED_FIELDS = {"holdout_points": 0, "normalization_excludes": 0}


@dataclass(frozen=True)
class BatchLayout:
    dp_rank: int
    dp_size: int
    global_batch_size: int
    micro_batch_size: int

    def __post_init__(self):
        def bad(field, value, why):
            raise DataError("build_train_loader", field, value, why)

        if not 0 <= self.dp_rank < self.dp_size:
            bad("dp_rank", self.dp_rank, f"must be in [0, dp_size={self.dp_size})")
        if self.micro_batch_size < 1:
            bad("micro_batch_size", self.micro_batch_size, "must be positive")
        if self.global_batch_size < 1 or self.global_batch_size % (self.dp_size * self.micro_batch_size):
            bad("global_batch_size", self.global_batch_size,
                f"must be a positive multiple of dp_size × micro_batch_size = {self.dp_size} × {self.micro_batch_size}")

    @property
    def rows_per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def accum_steps(self) -> int:
        return self.rows_per_rank // self.micro_batch_size

    def rows(self, step: int) -> np.ndarray:
        """Global row indices of this rank's local micro-batch number `step`."""
        g, i = divmod(step, self.accum_steps)
        first = g * self.global_batch_size + self.dp_rank * self.rows_per_rank + i * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size)


class MicroBatches(Dataset):
    def __init__(self, stream: SampleStream, layout: BatchLayout):
        self.stream, self.layout = stream, layout

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        arrays = self.stream.batch(self.layout.rows(step))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class TrainLoader:
    """Iterable of micro-batch dicts (inputs, labels, loss_mask, sequence_ids, domain_ids), endless.

    `state_dict()` counts the micro-batches handed out; `load_state_dict()` before `iter()` continues from there,
    also under another dp_size / micro_batch_size as long as it stopped at a global-batch boundary.
    """

    def __init__(self, cfg: DataConfig, stream: SampleStream, layout: BatchLayout):
        self.cfg, self.stream, self.layout = cfg, stream, layout
        self.step = 0  # local micro-batches delivered

    @property
    def domain_names(self) -> list[str]:
        return self.stream.store.domain_names

    @property
    def accum_steps(self) -> int:
        return self.layout.accum_steps

    def __iter__(self):
        """Micro-batches from `self.step` on. Closing the generator (`close()`, or dropping it) shuts the worker
        processes down at once: they ignore stop signals and leave only when the trainer says so."""
        pin = torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory
        workers = self.cfg.num_workers
        loader = DataLoader(MicroBatches(self.stream, self.layout), batch_size=None,
                            sampler=itertools.count(self.step), num_workers=workers, pin_memory=pin,
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            worker_init_fn=ignore_stop_signals if workers else None)
        batches = iter(loader)
        try:
            for batch in batches:
                self.step += 1
                yield batch
        finally:
            if workers:  # DataLoader's own shutdown (it otherwise runs when the iterator is garbage-collected)
                batches._shutdown_workers()

    def where(self, micro_step: int, row: int, point: int) -> str:
        """Where point `point` (of the max_length + 1 a row holds) of row `row` of this rank's micro-batch
        `micro_step` was read from: the shard, its row, and the span of that sequence the point's piece holds
        (a non-finite value spoils its piece's whole normalisation)."""
        pieces = self.stream.pieces(self.layout.rows(micro_step)[row:row + 1])
        ends_P = np.cumsum(pieces.length_P)
        i = int(np.searchsorted(ends_P, point, side="right"))  # padding is zeros: a bad point lies in a piece
        start = int(pieces.start_P[i])
        return (f"{self.stream.store.locate(int(pieces.seq_P[i]))}, points {start}-"
                f"{start + int(pieces.length_P[i]) - 1}")

    def _stream_settings(self) -> dict:
        settings = {f: getattr(self.cfg, f) for f in _STREAM_FIELDS}
        settings["global_batch_size"] = self.layout.global_batch_size
        shards = "".join(s.sha256 for s in self.stream.store.manifest.shards)
        settings["shards_sha256"] = hashlib.sha256(shards.encode()).hexdigest()
        return settings

    def state_dict(self) -> dict:
        global_batch, micro_step = divmod(self.step, self.layout.accum_steps)
        return {"global_batch": global_batch, "micro_step": micro_step,
                "micro_batch_size": self.layout.micro_batch_size, "dp_size": self.layout.dp_size,
                "stream": self._stream_settings()}

    def load_state_dict(self, state: dict) -> None:
        for field, value in self._stream_settings().items():
            saved = state["stream"].get(field, _ADDED_FIELDS.get(field))
            if saved != value:
                raise DataError("data loader state", field, saved,
                                f"this run has {value!r}; the resumed stream would differ")
        same_layout = (state["micro_batch_size"], state["dp_size"]) == (self.layout.micro_batch_size,
                                                                       self.layout.dp_size)
        if state["micro_step"] and not same_layout:
            raise DataError("data loader state", "micro_step", state["micro_step"],
                            "saved inside a global batch; resume with the same dp_size and micro_batch_size")
        self.step = state["global_batch"] * self.layout.accum_steps + state["micro_step"]


def ignore_stop_signals(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build_train_loader(cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, global_batch_size: int = 1,
                       micro_batch_size: int = 1) -> TrainLoader:
    layout = BatchLayout(dp_rank, dp_size, global_batch_size, micro_batch_size)
    manifest = read_manifest(cfg.path)
    if cfg.verify_checksums:
        manifest.verify()
    return TrainLoader(cfg, SampleStream(manifest, cfg, load_plan(manifest, cfg)), layout)
