"""What a run directory promises: one live run at a time, and one lineage of checkpoints and metrics.

A run directory holds its checkpoints (`checkpoints/`), never is one: `run.dir=` naming a checkpoint folder or a
checkpoint is refused, with the run directory it belongs to.

The lock is a `flock` on `<run dir>/.lock`, which also names the host and process holding it: the kernel releases
it when that process ends however it ends (kill -9 included), so a dead run never blocks the next launch. A file
system without `flock` (Lustre mounted without `-o flock`) is refused in one line that says the way out.
`checkpoint.resume=false` moves the previous lineage aside into a folder of the run, never deletes it."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from ..checkpoint import LATEST, LINEAGE, MANIFEST, META, read_meta

LOCK = ".lock"
METRICS = "metrics.jsonl"


class RunInUse(RuntimeError):
    """Another live process holds the run directory; the message names it."""


class LockUnsupported(RuntimeError):
    """The run directory's file system has no `flock`; the message names the directory and the way out."""


# What flock raises where the file system does not implement it (Lustre without -o flock: ENOSYS; NFS without its
# lock daemon: ENOLCK; some FUSE file systems: EOPNOTSUPP).
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


class NotARunDir(ValueError):
    """run.dir names a checkpoint folder or a checkpoint; the message names the run directory to give instead."""


def check_run_dir(run_dir: Path, checkpoint_dir: Path) -> None:
    """Refuse a `run.dir` that is a run's checkpoint folder (it holds `latest` or `lineage`, and is not this
    config's own checkpoint.dir) or one of its checkpoints: run there, it would start a new run nested inside the
    old one instead of continuing it."""
    if run_dir != checkpoint_dir and ((run_dir / LATEST).is_file() or (run_dir / LINEAGE).is_file()):
        raise NotARunDir(f"run.dir={run_dir} is the checkpoint folder of a run, not a run directory; to continue "
                         f"that run give its directory: run.dir={run_dir.parent}")
    if (run_dir / META).is_file() and (run_dir / MANIFEST).is_file():
        raise NotARunDir(f"run.dir={run_dir} is a checkpoint (step {read_meta(run_dir).get('step')}), not a run "
                         f"directory; to continue that run give its directory: run.dir={run_dir.parent.parent}")


class RunLock:
    """Held by rank 0 from before it reads the run directory until the run (or the multirun job) ends."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunInUse(f"{run_dir} is in use by {holder}; one live run per run directory: wait for it, stop "
                           "it, or choose another run.dir") from None
        except OSError as e:
            os.close(self.fd)
            if e.errno not in _NO_FLOCK:
                raise
            raise LockUnsupported(
                f"{run_dir}: its file system cannot flock {path} ({os.strerror(e.errno)}), the lock that keeps a "
                "second launch off a live run: mount it with flock (Lustre: -o flock), or choose a run.dir on a "
                "file system that has it (local disk, NFS with its lock daemon)") from None
        os.ftruncate(self.fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.write(self.fd, f"timemoe-train pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode())

    def release(self) -> None:
        os.close(self.fd)  # the file stays: removing it would let a waiting launcher lock a file no one else sees


def set_aside(run_dir: Path, checkpoint_dir: Path) -> Path | None:
    """`checkpoint.resume=false`: the previous lineage (the checkpoint directory and metrics.jsonl) moves into
    `<run dir>/previous-<UTC time>/`, which is returned; None when there was nothing to move."""
    found = [p for p in (checkpoint_dir, run_dir / METRICS) if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if not found:
        return None
    aside = run_dir / time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for path in found:
        shutil.move(path, aside / path.name)
    return aside
