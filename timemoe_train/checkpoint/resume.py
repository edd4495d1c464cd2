"""Which checkpoint a run resumes from: the newest one that verifies against its manifest. Pure file work (no
engine, no process group), so that the launcher can say what it will do before anything starts."""

from __future__ import annotations

import warnings
from pathlib import Path

from .format import LATEST, CheckpointCorrupt, CheckpointError, step_tags
from .digests import verify


class CheckpointWarning(UserWarning):
    pass


def newest_verified(root: Path) -> str | None:
    """The newest checkpoint of `root` that matches its manifest (None: there are none); each one that does not
    gives a CheckpointWarning naming the file, and so does a `latest` that names no checkpoint (deleted by hand).
    Raises CheckpointError when checkpoints exist, or were pointed at, but none verifies."""
    bad = []
    tags = step_tags(root)
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if pointed is not None and pointed not in tags:
        bad.append(f"{root / LATEST} names {pointed!r}, which is not a directory of {root}")
        warnings.warn(bad[-1], CheckpointWarning, stacklevel=2)
    for tag in tags:
        try:
            verify(root / tag)
            return tag
        except CheckpointCorrupt as e:
            bad.append(str(e))
            warnings.warn(f"checkpoint {root / tag} is not used: {e}; falling back to the previous checkpoint",
                          CheckpointWarning, stacklevel=2)
    if bad:
        raise CheckpointError(f"no checkpoint in {root} verifies, so none was loaded and nothing was written "
                              f"(move the damaged ones away, or set checkpoint.resume=false): " + "; ".join(bad))
    return None


def resume_point(checkpoint_cfg) -> str | None:
    """The tag a run with this `checkpoint` config resumes from: the newest verified one, every rejected one
    warned about (always, also when the same warning was given before in this process); None: a new run."""
    if not checkpoint_cfg.resume:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        return newest_verified(Path(checkpoint_cfg.dir).resolve())
