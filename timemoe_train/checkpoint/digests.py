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
    (absolute path -> (size, sha256)). Sequential only: a seek would make the digest lie."""

    def __init__(self, path: str | Path, record: dict):
        super().__init__()
        self.path, self._record = Path(path).absolute(), record
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
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._record[str(self.path)] = (self._size, self._sha.hexdigest())
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(tag_dir: Path, group=None) -> None:
    """Raise CheckpointCorrupt naming the first file of `tag_dir` (in manifest order) that differs from its
    manifest. With `group` (a torch.distributed process group of several ranks; collective): each rank hashes a
    share of the files, balanced by size, and every rank raises the same error."""
    path = tag_dir / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointCorrupt(path, "missing: the checkpoint cannot be verified") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(path, f"unreadable ({e})") from None
    for name, want in files.items():  # sizes first: cheap, and what a truncated copy gets wrong
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointCorrupt(f, "missing (listed in the manifest)")
        if (size := f.stat().st_size) != want["size"]:
            raise CheckpointCorrupt(f, f"{size} bytes, the manifest says {want['size']} (truncated or overwritten)")
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    mine = _share(files, rank, world)
    bad = None
    total = sum(files[name]["size"] for name in mine)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {tag_dir.name}",
              disable=total < 2**30 or rank != 0) as bar:
        for index, name in enumerate(files):
            if name not in mine:
                continue
            try:
                same = file_digest(tag_dir / name)[1] == files[name]["sha256"]
            except OSError as e:
                bad = (index, name, f"unreadable ({e})")
                break
            if not same:
                bad = (index, name, "sha256 differs from the manifest (altered after writing)")
                break
            bar.update(files[name]["size"])
    if world > 1:
        verdicts = [None] * world
        dist.all_gather_object(verdicts, bad, group=group)
        bad = min((v for v in verdicts if v is not None), default=None)
    if bad is not None:
        raise CheckpointCorrupt(tag_dir / bad[1], bad[2])


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
