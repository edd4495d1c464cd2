"""`training_data.json` beside an exported model: the corpus it was trained on and what that corpus's leakage guard
kept out, so that `timemoe-eval` can tell whether a benchmark CSV was excluded from training.

    corpus           the run config's `data.path` as the run wrote it (a relative one is read from here), or null
    manifest_sha256  sha256 of the corpus's manifest.json, its fingerprint; null when it could not be read
    leakage_guard    the manifest's `leakage_guard` ({rule, name_pattern, block, benchmarks: [{file, sha256,
                     channels}], gift_eval?: [{data, configs: {name: {sha256, ...}}}]}) plus `excluded`, the number
                     of series it left or cut out; null when unknown or absent
    leakage_audit    what `timemoe-prep audit` found of each GIFT-Eval configuration in this very corpus, by the
                     configuration's digest ({config, windows, found, ...}); absent when it was not audited
    synthetic        true when the run trained on seeded synthetic series (`data=synthetic`): no real data, so no
                     benchmark's either
    note             what could not be read, when something could not

A corpus that cannot be read at export does not stop the export: the record says what is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from data_prep.corpus_manifest import MANIFEST_NAME
from data_prep.gift_leakage import read_audit

from ..checkpoint import CONFIG
from ..checkpoint.digests import file_digest
from ..model.hf_layout import TRAINING_DATA
from ..train.synthetic import SyntheticDataConfig


def training_data(tag_dir: Path) -> dict:
    record = {"corpus": None, "manifest_sha256": None, "leakage_guard": None}
    config_path = tag_dir / CONFIG
    try:
        data = yaml.safe_load(config_path.read_text())["data"]
        if str(data.get("_target_", "")).endswith(f".{SyntheticDataConfig.__name__}"):
            return {**record, "synthetic": True,
                    "note": f"trained on seeded synthetic series only (data=synthetic, seed {data.get('seed')})"}
        corpus = data["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        return {**record, "note": f"{config_path}: no data.path to read ({type(e).__name__}: {e}): corpus unknown"}
    manifest_path = Path(corpus) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return {**record, "corpus": corpus,
                "note": f"{manifest_path}: not readable at export ({e}): what its guard excluded is unknown"}
    record.update(corpus=corpus, manifest_sha256=file_digest(manifest_path)[1])
    audited = read_audit(corpus, record["manifest_sha256"])
    if audited:
        record["leakage_audit"] = audited
    # Corpora prepared before every source was guarded record it under `source` (the embedded source only).
    guard = manifest.get("leakage_guard") or manifest.get("source", {}).get("leakage_guard")
    if guard is None:
        return {**record, "note": f"{manifest_path}: prepared without a leakage guard"}
    # `excluded` counts the series the guard left out or cut (GIFT-Eval's test windows).
    return {**record, "leakage_guard": {**guard, "excluded": len(manifest.get("excluded", []))}}


def write_training_data(tag_dir: Path, out: Path) -> None:
    (out / TRAINING_DATA).write_text(json.dumps(training_data(tag_dir), indent=1) + "\n")


def summary(out: Path) -> str:
    """One line on what `out`'s training_data.json says, for the export's output."""
    record = json.loads((out / TRAINING_DATA).read_text())
    guard = record["leakage_guard"]
    if guard is None:
        return f"{TRAINING_DATA}: {record['note']}"
    files = ", ".join(b["file"] for b in guard["benchmarks"]) or "none"
    line = (f"{TRAINING_DATA}: corpus {record['corpus']}; benchmarks kept out by content: {files}; "
            f"{guard['excluded']} series excluded")
    for g in guard.get("gift_eval", []):
        line += f"; GIFT-Eval test windows of {g['data']} cut out ({len(g['configs'])} configurations)"
    audited = record.get("leakage_audit", {})
    if audited:
        held = sum(1 for a in audited.values() if a["found"])
        line += f"; audited for {len(audited)} GIFT-Eval configurations, test windows found of {held}"
    return line
