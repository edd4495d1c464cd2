"""Time-300B on disk (as published on the Hugging Face Hub, Maple728/Time-300B): ``<domain>/<dataset...>/`` folders holding ``meta.json`` + ``data-{i}-of-{n}.bin``,
or ``.jsonl``/``.json`` files of ``{"sequence": [...]}`` lines, or ``.npy`` files.

Naming: the domain is the top-level folder and the dataset is the folder path below it (``nature/era5/1989`` is
domain ``nature``, dataset ``era5/1989``); all data files of one folder form one dataset, except files lying directly
in a domain folder, which are each a dataset named by their stem. Files directly under the input root have no domain
and are listed as ignored, as are files of unknown type.

Validation happens here, before any shard is written: ``meta.json`` fields and types, ``.bin`` sizes against the
point counts ``meta.json`` declares, every sequence's ``offset + length`` against the stream, ``.npy`` headers, and
every JSON value. ``.bin`` and ``.npy`` data is not parsed at this stage, only measured, then read once through
memory maps by the leakage guard (``data_prep.index.screen_index``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.index import IndexedDataset, Stager, Stream, screen_index, write_index
from data_prep.leakage import LeakageGuard
from data_prep.sources.base import DatasetSpec, Discovery, to_float_array

META = "meta.json"
BIN_NAME = re.compile(r"data-(\d+)-of-(\d+)\.bin")
TEXT_SUFFIXES = (".jsonl", ".json")
NPY_SUFFIX = ".npy"


@dataclass(frozen=True)
class Time300BSource:
    input: str
    denormalize: bool = True  # apply scales' mean/std: original = value * std + mean
    name: str = "time300b"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input": str(Path(self.input).resolve()), "denormalize": self.denormalize}

    def discover(self) -> Discovery:
        root = Path(self.input)
        if not root.is_dir():
            raise PrepError(root, "--input", str(root), "not a directory (expected <domain>/<dataset>/ folders)")
        specs: dict[str, DatasetSpec] = {}
        ignored: list[dict[str, str]] = []

        def add(spec: DatasetSpec) -> None:
            if spec.key in specs:
                raise PrepError(spec.files[0], "dataset", spec.key, f"name also used by {specs[spec.key].files[0]}")
            specs[spec.key] = spec

        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(folder)
            parts = here.relative_to(root).parts
            data = sorted(f for f in files if not f.startswith("."))
            if not parts:
                ignored += [{"file": str(here / f), "reason": "not under a <domain>/ folder"} for f in data]
                continue
            domain, dataset = parts[0], "/".join(parts[1:])
            bins = [f for f in data if f.endswith(".bin")]
            if META in data or bins:
                listed = tuple(str(here / f) for f in [META, *bins])
                add(DatasetSpec(domain, dataset or domain, "bin", listed))
                data = [f for f in data if f != META and not f.endswith(".bin")]
            readable = [f for f in data if f.endswith(TEXT_SUFFIXES + (NPY_SUFFIX,))]
            ignored += [{"file": str(here / f), "reason": "unknown file type"} for f in data if f not in readable]
            groups = [[f] for f in readable] if not dataset else ([readable] if readable else [])
            for group in groups:
                kinds = {"npy" if f.endswith(NPY_SUFFIX) else "jsonl" for f in group}
                if len(kinds) > 1:
                    raise PrepError(here, "files", sorted(group), "a dataset folder mixes .npy and JSON files")
                name = dataset or Path(group[0]).stem
                add(DatasetSpec(domain, name, kinds.pop(), tuple(str(here / f) for f in group)))
        return Discovery(sorted(specs.values(), key=lambda s: s.key), ignored)

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
        if spec.kind == "bin":
            return screen_index(self._index_bin(spec, folder), guard)
        if spec.kind == "npy":
            return screen_index(_index_npy(spec, folder), guard)
        return _index_jsonl(spec, folder, guard)

    def _index_bin(self, spec: DatasetSpec, folder: Path) -> IndexedDataset:
        meta_path = Path(spec.files[0]).parent / META
        meta = _read_meta(meta_path)
        streams = _bin_streams(meta_path, meta)
        total = sum(s.points for s in streams)
        offset, length, mean, std = _scales(meta_path, meta, total, self.denormalize)
        return write_index(
            folder,
            domain=spec.domain,
            dataset=spec.dataset,
            freq=None,
            streams=streams,
            offset=offset,
            length=length,
            mean=mean,
            std=std,
        )


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise PrepError(path, "meta.json", None, "missing: a folder with .bin files needs its meta.json")
    text = path.read_text()
    if not text.strip():
        raise PrepError(path, "meta.json", text, "empty file")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepError(path, "json", f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}") from None
    if not isinstance(meta, dict):
        raise PrepError(path, "meta.json", type(meta).__name__, "must be a JSON object")
    for key in ("num_sequences", "dtype", "files", "scales"):
        if key not in meta:
            raise PrepError(path, key, None, "missing field")
    if not _is_int(meta["num_sequences"]) or meta["num_sequences"] < 0:
        raise PrepError(path, "num_sequences", meta["num_sequences"], "must be a non-negative integer")
    if meta["dtype"] != "float32":
        raise PrepError(path, "dtype", meta["dtype"], 'only "float32" is defined for Time-300B .bin files')
    if not isinstance(meta["files"], dict):
        raise PrepError(path, "files", meta["files"], "must map file names to point counts")
    if not isinstance(meta["scales"], list):
        raise PrepError(path, "scales", type(meta["scales"]).__name__, "must be a list, one entry per sequence")
    if len(meta["scales"]) != meta["num_sequences"]:
        raise PrepError(path, "scales", len(meta["scales"]), f"has not num_sequences={meta['num_sequences']} entries")
    return meta


def _bin_streams(meta_path: Path, meta: dict[str, Any]) -> list[Stream]:
    """The .bin files in stream order (by their index i), each checked against the point count meta.json gives."""
    numbered = []
    for name, points in meta["files"].items():
        match = BIN_NAME.fullmatch(name)
        if not match:
            raise PrepError(meta_path, "files", name, "file names must read data-{i}-of-{n}.bin")
        if not _is_int(points) or points < 0:
            raise PrepError(meta_path, f"files[{name!r}]", points, "point count must be a non-negative integer")
        numbered.append((int(match.group(1)), name, points))
    streams = []
    for _, name, points in sorted(numbered):
        path = meta_path.parent / name
        if not path.exists():
            raise PrepError(path, f"files[{name!r}]", points, "listed in meta.json but missing")
        size = path.stat().st_size
        if size != points * 4:
            have = f"{size // 4} points ({size} bytes)"
            problem = "truncated" if size < points * 4 else "larger than declared"
            raise PrepError(path, f"files[{name!r}]", points, f"{problem}: the file holds {have}")
        streams.append(Stream(str(path), 0, "<f4", points))
    return streams


def _scales(meta_path: Path, meta: dict[str, Any], total: int, denormalize: bool):
    scales = meta["scales"]
    n = len(scales)
    offset, length = np.empty(n, np.int64), np.empty(n, np.int64)
    mean, std = np.zeros(n, np.float64), np.ones(n, np.float64)
    scaled = False
    for i, s in enumerate(scales):
        if not isinstance(s, dict):
            raise PrepError(meta_path, f"scales[{i}]", s, "must be an object with offset and length")
        o, k = s.get("offset"), s.get("length")
        if not _is_int(o) or o < 0:
            raise PrepError(meta_path, f"scales[{i}].offset", o, "must be a non-negative integer")
        if not _is_int(k) or k < 0:
            raise PrepError(meta_path, f"scales[{i}].length", k, "must be a non-negative integer")
        if o + k > total:
            raise PrepError(meta_path, f"scales[{i}].offset", o, f"offset + length = {o + k} is past the {total} points")
        offset[i], length[i] = o, k
        if ("mean" in s) != ("std" in s):
            present = "mean" if "mean" in s else "std"
            raise PrepError(meta_path, f"scales[{i}].{present}", s[present], "mean and std must come together")
        if "mean" in s:
            for key in ("mean", "std"):
                if not _is_number(s[key]):
                    raise PrepError(meta_path, f"scales[{i}].{key}", s[key], "must be a finite number")
            mean[i], std[i] = s["mean"], s["std"]
            scaled = True
    if scaled and denormalize:
        return offset, length, mean, std
    return offset, length, None, None


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise PrepError(path, "file", "", "empty file")


def read_jsonl(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """The series of one ``.jsonl`` file of ``{"sequence": [...]}`` lines (the released fine-tuning format), each
    named ``<file name>:<line number>``; blank lines are skipped, anything else malformed is a PrepError."""
    _check_not_empty(path)
    found = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepError(path, f"line {line_no}", line[:60], f"malformed JSON: {e.msg}") from None
            if not isinstance(record, dict) or "sequence" not in record:
                raise PrepError(path, f"line {line_no}", line[:60], 'expected {"sequence": [...]}')
            yield f"{path.name}:{line_no}", to_float_array(record["sequence"], path, f"line {line_no}: sequence")
            found += 1
    if not found:
        raise PrepError(path, "file", "", "no sequences (only blank lines)")


def _index_jsonl(spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
    stager = Stager(folder, spec.domain, spec.dataset, guard)
    try:
        for name in spec.files:
            stager.add_all(read_jsonl(Path(name)))
        return stager.finish(freq=None)
    except BaseException:
        stager.abort()
        raise


def _npy_stream(path: Path) -> tuple[Stream, tuple[int, ...]]:
    _check_not_empty(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise PrepError(path, "header", None, f"not a valid .npy file: {e}") from None
        header = f.tell()
    if dtype.kind not in "fiu":
        raise PrepError(path, "dtype", str(dtype), "not a numeric array")
    if len(shape) not in (1, 2):
        raise PrepError(path, "shape", shape, "expected one sequence (1-D) or one per row (2-D)")
    if fortran and len(shape) == 2:
        raise PrepError(path, "fortran_order", True, "rows are not contiguous; save with np.ascontiguousarray")
    points = int(np.prod(shape))
    need = header + points * dtype.itemsize
    if path.stat().st_size < need:
        raise PrepError(path, "shape", shape, f"truncated: {path.stat().st_size} bytes, needs {need}")
    return Stream(str(path), header, dtype.str, points), shape


def _index_npy(spec: DatasetSpec, folder: Path) -> IndexedDataset:
    streams, lengths, ids = [], [], []
    for name in spec.files:
        path = Path(name)
        stream, shape = _npy_stream(path)
        streams.append(stream)
        if len(shape) == 1:
            lengths.append(shape[0])
            ids.append(f"{spec.key}/{path.stem}")
        else:
            lengths += [shape[1]] * shape[0]
            ids += [f"{spec.key}/{path.stem}/{row}" for row in range(shape[0])]
    length = np.array(lengths, dtype=np.int64)
    return write_index(
        folder,
        domain=spec.domain,
        dataset=spec.dataset,
        freq=None,
        streams=streams,
        offset=np.cumsum(length) - length,
        length=length,
        item_id=ids,
    )
