"""Reading prepared shards: values round-trip, and every kind of damaged corpus fails naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.shards import ShardWriter, make_batch, shard_name

from timemoe_train.data import DataError
from timemoe_train.data.manifest import SCHEMA_VERSION
from timemoe_train.data.shards import ShardStore



def write_corpus(directory: Path, series: list[tuple[str, str, np.ndarray]], num_shards: int = 2) -> Path:
    """Shards (through timemoe-prep's writer) and manifest; series = [(domain, dataset, values)]."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, domains, datasets = [], {}, {}
    for k, idx in enumerate(np.array_split(np.arange(len(series)), num_shards)):
        path = directory / shard_name(k, num_shards)
        writer = ShardWriter(path)
        for i in idx:  # one record batch per series: several batches per shard
            domain, dataset, values = series[i]
            writer.write(make_batch([f"item{i}"], domain, dataset, None, np.asarray(values, np.float32),
                                    np.array([len(values)])))
        _, digest = writer.commit()
        shards.append({"file": path.name, "rows": len(idx), "points": sum(len(series[i][2]) for i in idx),
                       "sha256": digest})
    for domain, dataset, values in series:
        for counts, key in ((domains, domain), (datasets, dataset)):
            entry = counts.setdefault(key, {"sequences": 0, "points": 0})
            entry["sequences"] += 1
            entry["points"] += len(values)
    manifest = {"schema_version": SCHEMA_VERSION, "shards": shards, "domains": domains, "datasets": datasets}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def random_series(rng: np.random.Generator, lengths: list[int], domain: str = "energy", dataset: str = "d0"):
    return [(domain, dataset, rng.normal(3.0, 2.0, n).astype(np.float32)) for n in lengths]


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    series = random_series(rng, [5, 40, 7, 100], "energy", "e1") + random_series(rng, [60, 3, 9], "web", "w1")
    return write_corpus(tmp_path / "corpus", series, num_shards=2), series


def test_values_and_labels_round_trip(corpus):
    path, series = corpus
    store = ShardStore(path, verify=True)
    assert len(store) == len(series)
    assert store.domain_names == ["energy", "web"] and store.dataset_names == ["e1", "w1"]
    for s, (domain, dataset, values) in enumerate(series):
        np.testing.assert_array_equal(store.sequence(s), values)
        assert store.domain_names[store.domain_S[s]] == domain
        assert store.dataset_names[store.dataset_S[s]] == dataset


def test_checksum_mismatch_names_the_shard(corpus):
    path, _ = corpus
    shard = path / "shard-00001-of-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001-of-00002.arrow: sha256 = .*does not match"):
        ShardStore(path, verify=True)


def test_truncated_shard_names_the_shard(corpus):
    path, _ = corpus
    shard = path / "shard-00000-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="shard-00000-of-00002.arrow: file = .*truncated or corrupt"):
        ShardStore(path)


def test_schema_version_mismatch(corpus):
    path, _ = corpus
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: schema_version = {SCHEMA_VERSION + 1}"):
        ShardStore(path)


def test_shard_that_disagrees_with_the_manifest(corpus):
    path, _ = corpus
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][1]["points"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard-00001-of-00002.arrow: rows/points .* truncated or stale"):
        ShardStore(path)
