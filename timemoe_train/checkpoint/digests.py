"""Every file of a checkpoint with its size and sha256, hashed as the bytes are written, fsynced; checked on load.

`DigestWriter` is the file object everything in a checkpoint is written through (torch.save, DeepSpeed's
checkpoint engine, torch.distributed.checkpoint's writer); `write_manifest` lists what every rank wrote, and
`verify` raises `CheckpointCorrupt` naming the first file that is missing, has another size, or other bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

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


def verify(tag_dir: Path) -> None:
    """Raise CheckpointCorrupt naming the first file of `tag_dir` that differs from its manifest."""
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
    total = sum(w["size"] for w in files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {tag_dir.name}",
              disable=total < 2**30) as bar:
        for name, want in files.items():
            if file_digest(tag_dir / name)[1] != want["sha256"]:
                raise CheckpointCorrupt(tag_dir / name, "sha256 differs from the manifest (altered after writing)")
            bar.update(want["size"])
