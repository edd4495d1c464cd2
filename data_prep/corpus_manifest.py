"""``manifest.json``: what a prepared corpus holds, for the training loader and for the people training on it.

Structure (``SCHEMA_VERSION`` 1; all counts are integers, "points" are float32 values)::

    schema_version  1
    tool            {name: "timemoe-prep", version}
    source          what was read: {name, input?, ...source options}; for "embedded" also the package versions and
                    the reason for each dataset's domain label
    options         {shard_bytes, batch_points, on_error, clean: {max_gap, min_length, drop_constant}}
    leakage_guard   {rule, name_pattern, block, benchmarks: [{file, sha256, channels}]}: what every series was
                    checked against (``data_prep.leakage``); ``timemoe-export`` copies it next to the model
    format          {container: "arrow-ipc-file", compression: null, columns: {name: arrow type}}
    totals          {shards, sequences, points, bytes}
    shards          [{file, rows, points, bytes, sha256, stats: {file, bytes, sha256},
                      domains: {domain: {sequences, points}}, datasets: {"<domain>/<dataset>": {sequences, points}}}],
                    in corpus order; ``stats`` is the shard's per-row (mean, std) file (absent in older corpora)
    domains         {domain: {datasets, sequences, points}}
    datasets        {"<domain>/<dataset>": {domain, dataset, freq, sequences, points,
                                            input: {sequences, points}, cleaning: {rule: {count, points}}}}
    cleaning        {input: {sequences, points}, output: {sequences, points}, rules: {rule: {count, points}}}
                    (rules and the meaning of count/points: ``data_prep.clean``)
    skipped         [{domain, dataset, file, field, value, problem}]  datasets left out by --on-error skip
    ignored         [{file, reason}]  input files that are not data (unknown type, outside a domain folder)
    excluded        [{item_id, reason}]  series the leakage guard left out (``data_prep.leakage``); each dataset's
                    entry lists its own under ``excluded`` too

``sequences``/``points`` are what the shards hold, after cleaning; ``input`` is what was read. The manifest holds no
timestamps or machine details, so the same input and options give the same manifest, byte for byte.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from data_prep.clean import RULES, add_counts, new_counts
from data_prep.errors import PrepError
from data_prep.index import IndexedDataset
from data_prep.shards import SCHEMA, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def tool_version() -> str:
    try:
        return metadata.version("timemoe-train")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_manifest(
    identity: dict[str, Any],
    datasets: list[IndexedDataset],
    shards: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    ignored: list[dict[str, str]],
) -> dict[str, Any]:
    entries: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        entries[ds.key] = {
            "domain": ds.domain,
            "dataset": ds.dataset,
            "freq": ds.freq,
            "sequences": 0,
            "points": 0,
            "input": {"sequences": ds.sequences, "points": ds.points},
            "cleaning": new_counts(),
        }
        if ds.excluded:
            entries[ds.key]["excluded"] = list(ds.excluded)
    shard_entries = []
    for shard in shards:
        by_domain: dict[str, dict[str, int]] = {}
        for key, stats in shard["datasets"].items():
            entry = entries[key]
            entry["sequences"] += stats["sequences"]
            entry["points"] += stats["points"]
            add_counts(entry["cleaning"], stats["cleaning"])
            d = by_domain.setdefault(entry["domain"], {"sequences": 0, "points": 0})
            d["sequences"] += stats["sequences"]
            d["points"] += stats["points"]
        keys = ("file", "rows", "points", "bytes", "sha256", "stats")
        shard_entries.append({k: shard[k] for k in keys if k in shard} | {
            "domains": dict(sorted(by_domain.items())),
            "datasets": {key: {k: s[k] for k in ("sequences", "points")} for key, s in shard["datasets"].items()},
        })

    domains: dict[str, dict[str, int]] = {}
    rules = new_counts()
    for entry in entries.values():
        d = domains.setdefault(entry["domain"], {"datasets": 0, "sequences": 0, "points": 0})
        d["datasets"] += 1
        d["sequences"] += entry["sequences"]
        d["points"] += entry["points"]
        add_counts(rules, entry["cleaning"])
    count = lambda key: sum(e[key] for e in entries.values())  # noqa: E731
    count_input = lambda key: sum(e["input"][key] for e in entries.values())  # noqa: E731
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "timemoe-prep", "version": tool_version()},
        **identity,
        "format": {
            "container": "arrow-ipc-file",
            "compression": None,
            "columns": {f.name: str(f.type) for f in SCHEMA},
        },
        "totals": {
            "shards": len(shard_entries),
            "sequences": count("sequences"),
            "points": count("points"),
            "bytes": sum(s["bytes"] for s in shard_entries),
        },
        "shards": shard_entries,
        "domains": dict(sorted(domains.items())),
        "datasets": entries,
        "cleaning": {
            "input": {"sequences": count_input("sequences"), "points": count_input("points")},
            "output": {"sequences": count("sequences"), "points": count("points")},
            "rules": {rule: rules[rule] for rule in RULES},
        },
        "skipped": skipped,
        "ignored": ignored,
        "excluded": [e for ds in datasets for e in ds.excluded],
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared corpus; refuses a schema version this code does not know."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        raise PrepError(path, "manifest.json", None, "missing: not a finished timemoe-prep output")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PrepError(path, "schema_version", manifest.get("schema_version"), f"expected {SCHEMA_VERSION}")
    return manifest


def shard_paths(out_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[Path]:
    manifest = manifest or load_manifest(out_dir)
    return [Path(out_dir) / s["file"] for s in manifest["shards"]]


def verify_shards(out_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every shard's (and statistics file's) size and sha256 against the manifest; raises PrepError on the
    first mismatch."""
    manifest = manifest or load_manifest(out_dir)
    for shard in manifest["shards"]:
        for entry in (shard, shard.get("stats")):
            if entry is None:
                continue
            path = Path(out_dir) / entry["file"]
            if not path.exists():
                raise PrepError(path, "file", entry["file"], "listed in the manifest but missing")
            if path.stat().st_size != entry["bytes"]:
                raise PrepError(path, "bytes", path.stat().st_size, f"the manifest says {entry['bytes']}")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise PrepError(path, "sha256", digest, f"the manifest says {entry['sha256']}")
