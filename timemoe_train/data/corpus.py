"""The corpus manifest (`data_prep.corpus_manifest`) as the loader needs it, read by timemoe-prep's own reader (which
checks the schema version)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.errors import PrepError
from data_prep.corpus_manifest import MANIFEST_NAME, load_manifest, verify_shards

from .errors import DataError


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    points: int
    bytes: int
    sha256: str
    stats: dict | None  # {file, bytes, sha256} of the per-row (mean, std) file; None in older corpora


@dataclass(frozen=True)
class Manifest:
    path: Path
    raw: dict
    shards: list[ShardInfo]

    @property
    def domains(self) -> dict[str, dict]:
        """domain -> {datasets, sequences, points}"""
        return self.raw["domains"]

    @property
    def datasets(self) -> dict[str, dict]:
        """"<domain>/<dataset>" -> {domain, dataset, sequences, points, …}"""
        return self.raw["datasets"]

    def verify(self) -> None:
        """Size and SHA-256 of every shard (and its statistics file) against the manifest."""
        try:
            for shard in tqdm(self.raw["shards"], desc="verifying shards", unit="shard"):
                verify_shards(self.path.parent, {**self.raw, "shards": [shard]})
        except PrepError as e:
            raise DataError(e.file, e.field, e.value, f"{e.problem}: the shard is corrupt or was replaced") from None


def read_manifest(directory: str | Path) -> Manifest:
    try:
        raw = load_manifest(directory)
    except PrepError as e:
        raise DataError(e.file, e.field, e.value, e.problem) from None
    path = Path(directory) / MANIFEST_NAME
    shards = [ShardInfo(path.parent / s["file"], s["rows"], s["points"], s["bytes"], s["sha256"], s.get("stats"))
              for s in raw["shards"]]
    return Manifest(path, raw, shards)
