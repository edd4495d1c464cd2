"""Which checkpoint a run resumes from, and `timemoe-export` exports: the one `latest` names, else the lineage's
previous ones in write order, the first that verifies against its manifest. File work (no engine; at most a process
group to share the hashing), so that the launcher can say what it will do before anything else starts.

A run that resumes past damaged checkpoints takes them out of its lineage (`resume_point`), so that they are never
tried again nor count against checkpoint.keep_last (which would prune good older ones first), and points `latest` at
the one it resumed from. Their directories stay where they were, untouched, for whoever wants to look at them; the
warning names each, and pruning never removes them (a later save of the same step replaces one)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from .format import LATEST, LINEAGE, OLD_PREFIX, TMP_PREFIX, CheckpointCorrupt, CheckpointError, lineage
from .digests import fsync_dir, verify, write_atomically


class CheckpointWarning(UserWarning):
    pass


def resolve_checkpoint(root: Path, group=None) -> str | None:
    """The checkpoint of `root` to continue from (None: there are none): `latest`, then the rest of the lineage,
    newest written first. Each one skipped (damaged, or deleted by hand) gives a CheckpointWarning naming it.
    Raises CheckpointError when checkpoints exist, or were pointed at, but none verifies. `group`: verified by
    all its ranks together (collective; see `verify`)."""
    return _resolve(root, group)[0]


def _resolve(root: Path, group) -> tuple[str | None, list[str]]:
    """`resolve_checkpoint`'s tag, and the tags it skipped."""
    bad, skipped = [], []
    pointed = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    candidates = list(dict.fromkeys(([pointed] if pointed else []) + lineage(root)[::-1]))
    for tag in candidates:
        if not (root / tag).is_dir():
            what = f"{root / LATEST} names {tag!r}" if tag == pointed else f"{root} lists {tag!r} in its lineage"
            bad.append(f"{what}, which is not a directory of {root}")
            warnings.warn(bad[-1], CheckpointWarning, stacklevel=3)
            skipped.append(tag)
            continue
        try:
            verify(root / tag, group)
            return tag, skipped
        except CheckpointCorrupt as e:
            bad.append(str(e))
            skipped.append(tag)
            warnings.warn(f"checkpoint {root / tag} is not used: {e}; falling back to the previous checkpoint",
                          CheckpointWarning, stacklevel=3)
    if bad:
        raise CheckpointError(f"no checkpoint in {root} verifies, so none was loaded and nothing was written "
                              f"(move the damaged ones away, or set checkpoint.resume=false): " + "; ".join(bad))
    return None, skipped


def drop_from_lineage(root: Path, skipped: list[str], resumed: str) -> str:
    """Take the `skipped` checkpoints out of `root`'s lineage and point `latest` at `resumed` (one process, once
    every rank has verified); their directories stay. Returns the line that says so."""
    write_atomically(root / LINEAGE, "".join(t + "\n" for t in lineage(root) if t not in skipped))
    write_atomically(root / LATEST, resumed)
    stay = [str(root / t) for t in skipped if (root / t).is_dir()]
    return (f"{root}: {', '.join(skipped)} left the lineage (resuming from {resumed}, which `latest` now names)"
            + (f"; the damaged directories stay, never resumed from nor pruned: remove them when done with them "
               f"({', '.join(stay)})" if stay else ""))


def repair_interrupted_saves(root: Path) -> list[str]:
    """Undo what a save killed midway left in `root`, before anything looks for a checkpoint there (one process,
    while the others wait): a checkpoint set aside for a re-save of its step (`.old-<tag>`) goes back in place
    unless the new copy is there and verifies; an unfinished save's `.tmp-<tag>` is removed (it never became a
    checkpoint). Returns a line for each checkpoint put back."""
    if not root.is_dir():
        return []
    said = []
    for old in sorted(root.glob(OLD_PREFIX + "*")):
        tag = root / old.name[len(OLD_PREFIX):]
        if tag.is_dir():
            try:
                verify(tag)
                shutil.rmtree(old)  # the re-save was complete: only its clean-up was cut short
                continue
            except CheckpointCorrupt as e:
                why = f"its new copy is torn ({e})"
                shutil.rmtree(tag)
        else:
            why = "its new copy never arrived"
        os.replace(old, tag)
        said.append(f"{tag}: put back the copy a re-save of this step had set aside, as {why}")
    for tmp in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    return said


def resume_point(checkpoint_cfg) -> str | None:
    """The tag a run with this `checkpoint` config resumes from (`resolve_checkpoint`), every rejected one warned
    about by rank 0 (always, also when the same warning was given before in this process), and taken out of the
    lineage by rank 0 (`drop_from_lineage`); None: a new run. Collective when torch.distributed runs several
    processes: they verify the files together. (checkpoint.resume=false has moved the previous lineage aside, and
    `repair_interrupted_saves` has run, before this is asked.)"""
    import torch.distributed as dist

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    main = group is None or dist.get_rank() == 0
    root = Path(checkpoint_cfg.dir).resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("always" if main else "ignore", CheckpointWarning)
        tag, skipped = _resolve(root, group)
        if tag is not None and skipped and main:
            warnings.warn(drop_from_lineage(root, skipped, tag), CheckpointWarning, stacklevel=2)
    return tag
