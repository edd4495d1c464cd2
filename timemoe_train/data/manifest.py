"""The manifest as the loader needs it: shard files with their sizes and checksums, point counts per group."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

SCHEMA_VERSION = 1  # TEMPORARY until data_prep.manifest lands


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    points: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    shards: list[ShardInfo]
    domains: dict[str, dict]  # name -> {"sequences": n, "points": n}
    datasets: dict[str, dict]


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(path, "file", str(path), "no manifest.json here; run timemoe-prep first")
    raw = json.loads(path.read_text())
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise DataError(path, "schema_version", raw.get("schema_version"),
                        f"this loader reads schema version {SCHEMA_VERSION}; re-run timemoe-prep")
    shards = [ShardInfo(path.parent / s["file"], s["rows"], s["points"], s["sha256"]) for s in raw["shards"]]
    return Manifest(path, shards, raw["domains"], raw["datasets"])
