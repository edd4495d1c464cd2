"""The elastic part of a checkpoint (`<tag>/elastic/`): torch.distributed.checkpoint (DCP) files holding every
parameter and Adam moment in fp32 under its released name (experts by global index, so EP rank r's local expert i
is `experts.{r·E/EP + i}`), and the optimizer's step count. DCP writes each entry once, whichever ranks hold it,
and reads back any entry on any rank: a run resumes under another world size, expert-parallel size or ZeRO stage,
and `timemoe-export` reads the fp32 weights without DeepSpeed.

Why DCP and not DeepSpeed's universal checkpoint: `ds_to_universal` names parameters as the saving rank's module
does, so megatron's experts keep their *local* index (`local_experts.i`) and EP ranks collide; its EP slicing
expects experts stacked on dim 0 (AutoEP), and it needs ZeRO >= 1 files (stage 0 writes none).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .format import CheckpointError
from .digests import DigestWriter

MODEL = "model"  # fp32 (master) weights
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, by DeepSpeed's optimizer-state key
OPTIMIZER_STEP = "optimizer_step"  # Adam's step count (bias correction), the same for every parameter


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


def save(state: dict, directory: Path, records: dict) -> None:
    """Collective: every rank passes its entries (replicated ones are written once); file digests -> records."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory, thread_count=1, sync_files=True)
    writer.fs = _filesystem(records)
    dcp.save(state, storage_writer=writer)


def load(state: dict, directory: Path, no_dist: bool = False) -> None:
    """Fill `state`'s tensors in place from `directory` (any layout wrote it); a missing entry is an error."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # DCP's notice that no_dist means one process, which is what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=directory, no_dist=no_dist)
    except Exception as e:  # DCP wraps per-rank failures in its own CheckpointException
        raise CheckpointError(f"{directory}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}") from e


def entry_shapes(directory: Path) -> dict[str, torch.Size]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(directory).read_metadata()
    return {k: m.size for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights under their released names, in one process."""
    shapes = entry_shapes(directory)
    prefix = MODEL + "."
    state = {MODEL: {k[len(prefix):]: torch.empty(s, dtype=torch.float32)
                     for k, s in shapes.items() if k.startswith(prefix)}}
    load(state, directory, no_dist=True)
    return state[MODEL]
