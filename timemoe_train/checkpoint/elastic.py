"""The elastic part of a checkpoint (`<tag>/elastic/`): torch.distributed.checkpoint (DCP) files holding every
parameter and Adam moment in fp32 under its released name (experts by global index, so EP rank r's local expert i
is `experts.{r·E/EP + i}`), and the optimizer's step count. Any rank reads back any range of any entry: a run
resumes under another world size, expert-parallel size or ZeRO stage, and `timemoe-export` reads the fp32 weights
without DeepSpeed.

Sharded: each rank writes only the ranges it owns (its ZeRO partition of a tensor, flattened, is a range of the
released tensor's elements), as DCP chunks of the released-shape tensor, and reads only the ranges it needs; DCP's
resharding computes the overlaps. A range that is not whole rows is cut into at most three boxes (`Chunks.of_range`)
because DCP's chunks are boxes. DeepSpeed's universal checkpoint keeps ZeRO fragments as flat ranges the same way.

Why DCP and not DeepSpeed's universal checkpoint: `ds_to_universal` names parameters as the saving rank's module
does, so megatron's experts keep their *local* index (`local_experts.i`) and EP ranks collide; its EP slicing
expects experts stacked on dim 0 (AutoEP), and it needs ZeRO >= 1 files (stage 0 writes none).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .format import CheckpointError
from .digests import DigestWriter

MODEL = "model"  # fp32 (master) weights
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, by DeepSpeed's optimizer-state key
OPTIMIZER_STEP = "optimizer_step"  # Adam's step count (bias correction), the same for every parameter


@dataclass
class Chunks:
    """The boxes of one entry (a tensor of shape `size`) that this rank writes or reads: box offsets -> the box's
    data (written from, or read into)."""

    size: torch.Size
    boxes: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> Chunks:
        return cls(tensor.shape, {(0,) * tensor.dim(): tensor})

    def add_range(self, start: int, flat: torch.Tensor) -> None:
        """`flat` (1-D) holds elements [start, start + len(flat)) of the entry in row-major order."""
        for offsets, sizes, first in _boxes(tuple(self.size), start, start + flat.numel()):
            self.boxes[offsets] = flat[first - start: first - start + math.prod(sizes)].view(sizes)

    def staged(self, host_copy) -> Chunks:
        """A copy in host memory (what a background write reads while training goes on): `host_copy(box)`."""
        return Chunks(self.size, {o: host_copy(t) for o, t in self.boxes.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.boxes.values())


def _boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Elements [start, stop) of a row-major tensor of `shape` as boxes (offsets, sizes, first element's flat index),
    each contiguous in the flat order: a partial first row, the whole rows, a partial last row (recursively)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (stop - start,) * len(shape), start)]
    row = math.prod(shape[1:])
    first, last = -(-start // row), stop // row  # the whole rows are [first, last)

    def within(r: int, lo: int, hi: int):
        return [((r, *o), (1, *s), r * row + f) for o, s, f in _boxes(shape[1:], lo - r * row, hi - r * row)]

    if first > last:  # inside one row
        return within(last, start, stop)
    out = within(first - 1, start, first * row) if start < first * row else []
    if first < last:
        out.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:]), first * row))
    if last * row < stop:
        out += within(last, last * row, stop)
    return out


class _SavePlanner(DefaultSavePlanner):
    """DCP's default planner (dedup of what several ranks hold, global metadata) over a flat {entry: Chunks}."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([
            WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), data.shape),
                                                  properties=TensorProperties.create_from_tensor(data),
                                                  size=chunks.size))
            for fqn, chunks in self.state_dict.items() for offsets, data in chunks.boxes.items()])
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].boxes[tuple(index.offset)]


class _LoadPlanner(DefaultLoadPlanner):
    """Reads into the boxes of each {entry: Chunks}: only the saved chunks that overlap them."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # Not the default's: it would replace every value that is not a tensor (a Chunks) with None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        saved, items = self.metadata.state_dict_metadata, []
        for fqn, chunks in self.state_dict.items():
            if fqn not in saved:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            if getattr(saved[fqn], "size", None) != chunks.size:
                raise RuntimeError(f"{fqn}: saved with shape {tuple(getattr(saved[fqn], 'size', ()))}, this model "
                                   f"has {tuple(chunks.size)}")
            items += create_read_items_for_chunk_list(
                fqn, saved[fqn], [ChunkStorageMetadata(torch.Size(o), t.shape) for o, t in chunks.boxes.items()])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn].boxes[tuple(index.offset)]


def _filesystem(records: dict):
    from torch.distributed.checkpoint.filesystem import FileSystem

    class DigestingFileSystem(FileSystem):
        """DCP's local file system, writing through DigestWriter (DCP renames its metadata into place)."""

        @contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with DigestWriter(path, records) as stream:
                yield stream

        def rename(self, path, new_path):
            super().rename(path, new_path)
            records[str(Path(new_path).absolute())] = records.pop(str(Path(path).absolute()))

    return DigestingFileSystem()


def save(state: dict[str, Chunks], directory: Path, records: dict, group=None) -> None:
    """Collective over `group`: every rank passes the chunks it holds (a chunk several ranks hold is written once);
    file digests -> records."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory, thread_count=1, sync_files=True)
    writer.fs = _filesystem(records)
    dcp.save(state, storage_writer=writer, planner=_SavePlanner(), process_group=group)


def load(state: dict[str, Chunks], directory: Path) -> None:
    """Collective: fill every box of `state` in place from `directory` (any layout wrote it, reading only the
    saved chunks that overlap); a missing entry is an error."""
    _load(state, directory, planner=_LoadPlanner())


def _load(state: dict, directory: Path, **options) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # DCP's notice that no_dist means one process, which is what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=directory, **options)
    except Exception as e:  # DCP wraps per-rank failures in its own CheckpointException
        raise CheckpointError(f"{directory}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}") from e


def entry_shapes(directory: Path) -> dict[str, torch.Size]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(directory).read_metadata()
    return {k: m.size for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights under their released names, in one process."""
    prefix = MODEL + "."
    state = {k: torch.empty(s, dtype=torch.float32) for k, s in entry_shapes(directory).items()
             if k.startswith(prefix)}
    _load(state, directory, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}
