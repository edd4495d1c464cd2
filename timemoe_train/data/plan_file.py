"""The plan file: named numpy arrays behind a JSON header, written whole and memory-mapped read-only.

Layout: MAGIC, the header's length (uint64), the JSON header {key, meta, arrays: {name: [dtype, shape, offset]},
data_bytes}, the arrays (each 64-byte aligned, offsets from the data start), the sha256 of the data, END. A reader
checks magic, header, total size and END before it maps anything (a truncated or torn file fails there); the
sha256 is checked on request, since it means reading the whole file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC, END = b"TMOEPLAN", b"PLAN-END"
_ALIGN = 64
_DIGEST = 64  # hex characters
_HASH_CHUNK = 64 << 20


class PlanFileError(Exception):
    """Why a plan file cannot be used (the caller decides whether to rebuild or refuse)."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def write_plan_file(path: Path, key: str, meta: dict, arrays: dict[str, np.ndarray | list[np.ndarray]]) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a reader never sees half a file.

    An array may come as a list of parts (same dtype, joined along the first axis), written one after another."""
    arrays = {name: a if isinstance(a, list) else [a] for name, a in arrays.items()}
    layout, offset = {}, 0
    for name, parts in arrays.items():
        shape = [sum(len(a) for a in parts), *parts[0].shape[1:]]
        layout[name] = [parts[0].dtype.str, shape, offset]
        offset = _aligned(offset + sum(a.nbytes for a in parts))
    header = json.dumps({"key": key, "meta": meta, "arrays": layout, "data_bytes": offset}).encode()
    data_start = _aligned(16 + len(header))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(b"\0" * (data_start - f.tell()))
            for name, parts in arrays.items():
                at = f.tell() - data_start
                f.write(b"\0" * (layout[name][2] - at))
                digest.update(b"\0" * (layout[name][2] - at))
                for a in parts:
                    assert a.dtype.str == layout[name][0], name
                    raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                    for lo in range(0, len(raw), _HASH_CHUNK):
                        f.write(raw[lo:lo + _HASH_CHUNK])
                        digest.update(raw[lo:lo + _HASH_CHUNK])
            tail = data_start + offset - f.tell()
            f.write(b"\0" * tail)
            digest.update(b"\0" * tail)
            f.write(digest.hexdigest().encode() + END)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_plan_file(path: Path, key: str, verify: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of the plan with this key; the arrays are read-only views of one memory map."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 16 or f.read(8) != MAGIC:
                raise PlanFileError(f"not a plan file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 16 + header_len > size:
                raise PlanFileError(f"truncated: {size} bytes, shorter than its header")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise PlanFileError(f"damaged header ({e})") from None
            data_start = _aligned(16 + header_len)
            expected = data_start + header["data_bytes"] + _DIGEST + len(END)
            if size != expected:
                raise PlanFileError(f"truncated or torn: {size} bytes, its header says {expected}")
            if header["key"] != key:
                raise PlanFileError(f"built for another corpus or configuration (key {header['key'][:16]}…, "
                                    f"this run's is {key[:16]}…)")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # Batches read a few entries at random places: without this, each one also maps (and reads) the
            # pages around it, and a rank's resident set fills with plan pages it never uses.
            buffer.madvise(mmap.MADV_RANDOM)
            # ... but do bring the file into the page cache, in the background: random reads of a cold plan would
            # each wait for the disk. (The page cache is shared by every process mapping the file.)
            buffer.madvise(mmap.MADV_WILLNEED)
    except OSError as e:
        raise PlanFileError(f"unreadable ({e})") from None
    if buffer[size - len(END):] != END:
        raise PlanFileError("torn: its end marker is missing")
    if verify:
        digest = hashlib.sha256()
        for lo in range(data_start, data_start + header["data_bytes"], _HASH_CHUNK):
            digest.update(buffer[lo:min(lo + _HASH_CHUNK, data_start + header["data_bytes"])])
        stored = buffer[size - len(END) - _DIGEST:size - len(END)].decode()
        if digest.hexdigest() != stored:
            raise PlanFileError(f"damaged: sha256 {digest.hexdigest()[:16]}… differs from the recorded "
                                f"{stored[:16]}…")
    arrays = {}
    for name, (dtype, shape, offset) in header["arrays"].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(buffer, dt, count, data_start + offset).reshape(shape)
    return header["meta"], arrays
