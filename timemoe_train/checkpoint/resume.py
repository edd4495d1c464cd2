"""Which checkpoint a run resumes from, and `timemoe-export` exports: the one `latest` names, else the lineage's
previous ones in write order, the first that verifies against its manifest. File work (no engine; at most a process
group to share the hashing), so that the launcher can say what it will do before anything else starts."""

from __future__ import annotations

import warnings
from pathlib import Path

from .format import LATEST, CheckpointCorrupt, CheckpointError, lineage
from .digests import verify


class CheckpointWarning(UserWarning):
    pass


def resolve_checkpoint(root: Path, group=None) -> str | None:
    """The checkpoint of `root` to continue from (None: there are none): `latest`, then the rest of the lineage,
    newest written first. Each one skipped (damaged, or deleted by hand) gives a CheckpointWarning naming it.
    Raises CheckpointError when checkpoints exist, or were pointed at, but none verifies. `group`: verified by
    all its ranks together (collective; see `verify`)."""
    bad = []
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    candidates = list(dict.fromkeys(([pointed] if pointed else []) + lineage(root)[::-1]))
    for tag in candidates:
        if not (root / tag).is_dir():
            what = f"{root / LATEST} names {tag!r}" if tag == pointed else f"{root} lists {tag!r} in its lineage"
            bad.append(f"{what}, which is not a directory of {root}")
            warnings.warn(bad[-1], CheckpointWarning, stacklevel=2)
            continue
        try:
            verify(root / tag, group)
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
    """The tag a run with this `checkpoint` config resumes from (`resolve_checkpoint`), every rejected one warned
    about by rank 0 (always, also when the same warning was given before in this process); None: a new run.
    Collective when torch.distributed runs several processes: they verify the files together.
    (checkpoint.resume=false has moved the previous lineage aside before this is asked.)"""
    import torch.distributed as dist

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("always" if group is None or dist.get_rank() == 0 else "ignore", CheckpointWarning)
        return resolve_checkpoint(Path(checkpoint_cfg.dir).resolve(), group)
