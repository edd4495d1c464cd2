"""Reading prepared shards: values round-trip, and every kind of damaged corpus fails naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep.clean import new_counts
from data_prep.index import IndexedDataset
from data_prep.corpus_manifest import SCHEMA_VERSION, build_manifest, write_manifest
from data_prep.moments import sequence_moments
from data_prep.shards import ShardWriter, make_batch, shard_name, stats_name, write_stats

from timemoe_train.data import DataError
from timemoe_train.data.corpus import read_manifest
from timemoe_train.data.shards import ShardStore


def write_corpus(directory: Path, series: list[tuple[str, str, np.ndarray]], num_shards: int = 2,
                 stats: bool = True) -> Path:
    """A prepared corpus through timemoe-prep's shard writer and manifest builder; series = [(domain, dataset,
    values)]. Written directly rather than by `prepare` so that tests control every point (prep's cleaning drops
    the very short series packing is about). stats=False: no per-sequence statistics files, as an older
    timemoe-prep wrote."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, sizes = [], {}
    for k, idx in enumerate(np.array_split(np.arange(len(series)), num_shards)):
        path = directory / shard_name(k, num_shards)
        writer, per_dataset = ShardWriter(path), {}
        for i in idx:  # one record batch per series: several batches per shard
            domain, dataset, values = series[i]
            writer.write(make_batch([f"item{i}"], domain, dataset, None, np.asarray(values, np.float32),
                                    np.array([len(values)])))
            stats = per_dataset.setdefault(f"{domain}/{dataset}", {"sequences": 0, "points": 0,
                                                                   "cleaning": new_counts()})
            stats["sequences"] += 1
            stats["points"] += len(values)
            sizes[domain, dataset] = np.add(sizes.get((domain, dataset), 0), [1, len(values)])
        size, digest = writer.commit()
        shards.append({"file": path.name, "rows": len(idx), "points": sum(len(series[i][2]) for i in idx),
                       "bytes": size, "sha256": digest, "datasets": per_dataset})
        if stats:
            values = [np.asarray(series[i][2], np.float32) for i in idx]
            mean, std = sequence_moments(np.concatenate(values) if values else np.zeros(0, np.float32),
                                         np.concatenate([[0], np.cumsum([len(v) for v in values])]))
            stats_size, stats_digest = write_stats(directory / stats_name(path.name), mean, std)
            shards[-1]["stats"] = {"file": stats_name(path.name), "bytes": stats_size, "sha256": stats_digest}
    datasets = [IndexedDataset(domain, dataset, None, (), "", int(n), int(p), False, False)
                for (domain, dataset), (n, p) in sizes.items()]
    write_manifest(directory, build_manifest({}, datasets, shards, [], []))
    return directory


def random_series(rng: np.random.Generator, lengths: list[int], domain: str = "energy", dataset: str = "d0"):
    return [(domain, dataset, rng.normal(3.0, 2.0, n).astype(np.float32)) for n in lengths]


def open_store(path: Path, verify: bool = False) -> ShardStore:
    manifest = read_manifest(path)
    if verify:
        manifest.verify()
    return ShardStore.scan(manifest)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    series = random_series(rng, [5, 40, 7, 100], "energy", "e1") + random_series(rng, [60, 3, 9], "web", "w1")
    return write_corpus(tmp_path / "corpus", series, num_shards=2), series


def test_values_and_labels_round_trip(corpus):
    path, series = corpus
    store = open_store(path, verify=True)
    assert len(store) == len(series)
    assert store.domain_names == ["energy", "web"] and store.dataset_names == ["energy/e1", "web/w1"]
    for s, (domain, dataset, values) in enumerate(series):
        np.testing.assert_array_equal(store.sequence(s), values)
        assert store.domain_names[store.domain_S[s]] == domain
        assert store.dataset_names[store.dataset_S[s]] == f"{domain}/{dataset}"


def test_checksum_mismatch_names_the_shard(corpus):
    path, _ = corpus
    shard = path / "shard-00001-of-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001-of-00002.arrow: sha256 = .*the manifest says .*corrupt"):
        open_store(path, verify=True)


def test_truncated_shard_names_the_shard(corpus):
    path, _ = corpus
    shard = path / "shard-00000-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="shard-00000-of-00002.arrow: file = .*truncated or corrupt"):
        open_store(path)


def test_schema_version_mismatch(corpus):
    path, _ = corpus
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: schema_version = {SCHEMA_VERSION + 1}"):
        open_store(path)


def test_shard_that_disagrees_with_the_manifest(corpus):
    path, _ = corpus
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][1]["points"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard-00001-of-00002.arrow: rows/points .* truncated or stale"):
        open_store(path)


def test_shard_with_another_schema(corpus):
    path, _ = corpus
    shard = path / "shard-00000-of-00002.arrow"
    table = pa.table({"item_id": ["x"], "target": [[1.0, 2.0]]})
    with pa.ipc.new_file(shard, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match="shard-00000-of-00002.arrow: schema = 'item_id: string; target: list"):
        open_store(path)
