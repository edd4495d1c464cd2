"""Names inside a checkpoint directory, and the errors reading or writing one raises."""

from __future__ import annotations

import json
import re
from pathlib import Path

LATEST = "latest"
# The tag of the checkpoint with the lowest validation loss (trainer.val_interval), spared by pruning.
BEST = "best"
# The checkpoints of the run's current lineage still on disk, oldest first, one tag a line: the order resume falls
# back in and pruning counts in (a fallback to an older step makes write order differ from step order).
LINEAGE = "lineage"
TMP_PREFIX = ".tmp-"
# A checkpoint being replaced by a re-save of its step, kept under this name until the new copy is in place.
OLD_PREFIX = ".old-"
META = "meta.json"
CONFIG = "config.yaml"
CONSOLIDATED = "consolidated_model_states.pt"
MANIFEST = "manifest.json"
ELASTIC = "elastic"
# The train module holds the model as `model`: DeepSpeed's files name its weights `model.<model's own name>`.
MODEL_PREFIX = "model."
_TAG = re.compile(r"step(\d{8,})")


class CheckpointError(ValueError):
    """A checkpoint or HF-layout directory that cannot be read; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """A save that could not be completed (a rank's file system refused a write, or a rank's write hung): nothing
    was published. The message names the rank and the file."""


class CheckpointCorrupt(CheckpointError):
    """A file of a checkpoint is missing, truncated or altered since it was written (`path` names it)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path = path


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_tags(root: Path) -> list[str]:
    """The checkpoint directories of `root`, newest step first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]
    return sorted(tags, key=lambda t: int(_TAG.fullmatch(t)[1]), reverse=True)


def lineage(root: Path) -> list[str]:
    """The current lineage's checkpoints in write order, oldest first; a directory written before the lineage
    file existed: its checkpoints in step order."""
    path = root / LINEAGE
    if path.is_file():
        return path.read_text().split()
    return step_tags(root)[::-1]


def trainer_state_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def read_meta(tag_dir: Path) -> dict:
    path = tag_dir / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
