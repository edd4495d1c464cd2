"""Every file of a checkpoint with its size and sha256, hashed as the bytes are written, fsynced; checked on load.

`DigestWriter` is the file object everything in a checkpoint is written through (torch.save, DeepSpeed's
checkpoint engine, torch.distributed.checkpoint's writer); `write_manifest` lists what every rank wrote, and
`verify` raises `CheckpointCorrupt` naming the first file that is missing, has another size, or other bytes; in a
distributed run each rank hashes a share of the files and the verdict is all-gathered.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from .format import MANIFEST, CheckpointCorrupt

FORMAT_VERSION = 1


class DigestWriter(io.RawIOBase):
    """A new binary file: sha256 and size of its bytes as they pass; on close fsynced and entered in `record`
    (absolute path -> (size, sha256); None while it is open, and after a write to it failed: so a failure names its
    file). Sequential only: a seek would make the digest lie."""

    def __init__(self, path: str | Path, record: dict):
        super().__init__()
        self.path, self._record, self._file = Path(path).absolute(), record, None
        record[str(self.path)] = None
        self._file = open(self.path, "wb")
        self._sha, self._size = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = self._file.write(view)
        self._sha.update(view[:n])
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._file.fileno()

    def flush(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._record[str(self.path)] = (self._size, self._sha.hexdigest())
        super().close()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        self._file.close()  # left unrecorded: what was written is not the file's content
        super().close()


def file_digest(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(tag_dir: Path, records: dict) -> None:
    """`records` (absolute path -> (size, sha256)) of the files written into `tag_dir`; files there that were
    written past a DigestWriter (a library's own copy) are hashed now. Fsyncs the manifest and the directories."""
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        size, sha = records.get(str(path.absolute())) or file_digest(path)
        files[path.relative_to(tag_dir).as_posix()] = {"size": size, "sha256": sha}
    with DigestWriter(tag_dir / MANIFEST, {}) as f:
        f.write(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1).encode())
    for d in sorted({tag_dir, *((tag_dir / name).parent for name in files)}, reverse=True):
        fsync_dir(d)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds `text`, or (killed midway) what it held before: written aside, fsynced, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(tag_dir: Path, group=None) -> None:
    """Raise CheckpointCorrupt naming the first file of `tag_dir` (in manifest order) that differs from its
    manifest: a missing manifest or file, or a size, before any sha256. With `group` (a torch.distributed process
    group of several ranks; collective): each rank hashes a share of the files, balanced by size, and every rank
    raises the same error, also when the ranks see different things (a stale network file system cache): each
    rank's findings, its own reading of the manifest and the sizes included, go into one all_gather."""
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    files, bad = _check_sizes(tag_dir)  # bad: (kind, index in the manifest, path, why); kind 0 before 1 (hashes)
    if bad is None:
        bad = _check_hashes(tag_dir, files, _share(files, rank, world), rank)
    if world > 1:
        verdicts = [None] * world
        dist.all_gather_object(verdicts, bad, group=group)
        bad = min((v for v in verdicts if v is not None), default=None)
    if bad is not None:
        raise CheckpointCorrupt(tag_dir / bad[2], bad[3])


def _check_sizes(tag_dir: Path) -> tuple[dict, tuple | None]:
    """The manifest's files, and the first that is missing or has another size (cheap, and what a truncated copy
    gets wrong)."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return {}, (0, -1, MANIFEST, "missing: the checkpoint cannot be verified")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, (0, -1, MANIFEST, f"unreadable ({e})")
    for index, (name, want) in enumerate(files.items()):
        f = tag_dir / name
        if not f.is_file():
            return files, (0, index, name, "missing (listed in the manifest)")
        if (size := f.stat().st_size) != want["size"]:
            return files, (0, index, name, f"{size} bytes, the manifest says {want['size']} (truncated or overwritten)")
    return files, None


def _check_hashes(tag_dir: Path, files: dict, mine: set[str], rank: int) -> tuple | None:
    """The first of this rank's share of the files whose sha256 differs from the manifest's."""
    total = sum(files[name]["size"] for name in mine)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {tag_dir.name}",
              disable=total < 2**30 or rank != 0) as bar:
        for index, name in enumerate(files):
            if name not in mine:
                continue
            try:
                same = file_digest(tag_dir / name)[1] == files[name]["sha256"]
            except OSError as e:
                return 1, index, name, f"unreadable ({e})"
            if not same:
                return 1, index, name, "sha256 differs from the manifest (altered after writing)"
            bar.update(files[name]["size"])
    return None


def _share(files: dict, rank: int, world: int) -> set[str]:
    """The files rank `rank` of `world` hashes: the largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    mine = set()
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[name]["size"]
        if r == rank:
            mine.add(name)
    return mine
