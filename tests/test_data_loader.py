"""The stream across process layouts, resume, mixture weights and configuration errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_data_shards import random_series, write_corpus

from timemoe_train.data import DataConfig, DataError, build_train_loader

MAX_LENGTH = 24
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(3)
    lengths = lambda n: rng.integers(2, 90, n).tolist()  # noqa: E731 - short and long series alike
    series = (random_series(rng, lengths(30), "energy", "e1") + random_series(rng, lengths(20), "nature", "n1")
              + random_series(rng, lengths(10), "web", "w1"))
    return write_corpus(tmp_path_factory.mktemp("corpus"), series, num_shards=3)


def config(path, **overrides) -> DataConfig:
    return DataConfig(**{"path": str(path), "max_length": MAX_LENGTH, "num_workers": 0, **overrides})


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def global_batches(path, dp_size: int, micro: int, n_global: int, **overrides) -> list[dict[str, torch.Tensor]]:
    """Rebuild each global batch by concatenating every rank's micro-batches in rank order."""
    per_rank = []
    for rank in range(dp_size):
        loader = build_train_loader(config(path, **overrides), rank, dp_size, GLOBAL_BATCH, micro)
        per_rank.append(take(loader, n_global * loader.accum_steps))
    accum = GLOBAL_BATCH // dp_size // micro
    return [{k: torch.cat([mb[k] for r in range(dp_size) for mb in per_rank[r][g * accum:(g + 1) * accum]])
             for k in per_rank[0][0]} for g in range(n_global)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_global_batches_identical_for_1_2_4_ranks(corpus):
    reference = global_batches(corpus, 1, GLOBAL_BATCH, 5)
    assert reference[0]["inputs"].shape == (GLOBAL_BATCH, MAX_LENGTH)
    assert not torch.equal(reference[0]["inputs"], reference[1]["inputs"])
    for dp_size, micro in ((1, 2), (2, 4), (2, 1), (4, 2), (4, 1)):
        assert_same(global_batches(corpus, dp_size, micro, 5), reference)


def test_resume_gives_the_identical_stream_with_workers(corpus):
    cfg = config(corpus, num_workers=2, prefetch_factor=2)
    uninterrupted = take(build_train_loader(cfg, 1, 2, GLOBAL_BATCH, 2), 10)

    first = build_train_loader(cfg, 1, 2, GLOBAL_BATCH, 2)
    head = take(first, 3)  # workers have prefetched further; the state counts what was handed out
    state = first.state_dict()
    assert (state["global_batch"], state["micro_step"]) == (1, 1)
    resumed = build_train_loader(cfg, 1, 2, GLOBAL_BATCH, 2)
    resumed.load_state_dict(state)
    assert_same(head + take(resumed, 7), uninterrupted)


def test_resume_under_another_layout_at_a_global_batch_boundary(corpus):
    reference = global_batches(corpus, 1, GLOBAL_BATCH, 4)
    single = build_train_loader(config(corpus), 0, 1, GLOBAL_BATCH, 4)
    take(single, 4)  # two global batches
    state = single.state_dict()
    for rank in range(4):
        loader = build_train_loader(config(corpus), rank, 4, GLOBAL_BATCH, 1)
        loader.load_state_dict(state)
        got = torch.cat([m["inputs"] for m in take(loader, 4)])  # two micro-batches of one row per global batch
        expected = torch.cat([reference[g]["inputs"][2 * rank:2 * rank + 2] for g in (2, 3)])
        assert torch.equal(got, expected)

    take(single, 1)  # stop inside a global batch: only the same layout may continue
    with pytest.raises(DataError, match="micro_step = 1: saved inside a global batch"):
        build_train_loader(config(corpus), 0, 2, GLOBAL_BATCH, 4).load_state_dict(single.state_dict())


def test_resume_refuses_a_different_stream(corpus):
    state = build_train_loader(config(corpus), 0, 1, GLOBAL_BATCH, 4).state_dict()
    with pytest.raises(DataError, match="seed = 0: this run has 7"):
        build_train_loader(config(corpus, seed=7), 0, 1, GLOBAL_BATCH, 4).load_state_dict(state)
    with pytest.raises(DataError, match="global_batch_size = 8: this run has 16"):
        build_train_loader(config(corpus), 0, 1, 16, 4).load_state_dict(state)


def row_fractions(loader, n_rows: int) -> np.ndarray:
    groups, _ = loader.stream.mixture.locate(np.arange(n_rows))
    return np.bincount(groups, minlength=len(loader.stream.group_names)) / n_rows


@pytest.mark.parametrize("weights, temperature, block", [
    ({"energy": 1.0, "nature": 3.0}, 1.0, 65536),
    ({"energy": 1.0, "nature": 4.0, "web": 16.0}, 2.0, 1000),
])
def test_mixture_weights_are_respected(corpus, weights, temperature, block):
    loader = build_train_loader(config(corpus, mixture_weights=weights, mixture_temperature=temperature,
                                       mixture_block=block), 0, 1, GLOBAL_BATCH, GLOBAL_BATCH)
    w = np.array([weights.get(n, 0.0) for n in ("energy", "nature", "web")]) ** (1 / temperature)
    p = w / w.sum()
    n = 20_000
    tolerance = 4 * np.sqrt(p * (1 - p) / n) + 1e-9  # binomial; whole blocks are exact, so this is generous
    np.testing.assert_array_less(np.abs(row_fractions(loader, n) - p), tolerance + 1e-12)
    # The rows delivered carry their group's domain id on every real point.
    groups, _ = loader.stream.mixture.locate(np.arange(2 * GLOBAL_BATCH))
    batches = take(loader, 2)
    domain_ids = torch.cat([b["domain_ids"] for b in batches])
    for row, g in zip(domain_ids, groups):
        assert set(row[row >= 0].tolist()) == {g}


def test_default_mixture_is_proportional_to_points(corpus):
    loader = build_train_loader(config(corpus), 0, 1, GLOBAL_BATCH, GLOBAL_BATCH)
    domains = loader.stream.store.manifest.domains
    points = np.array([domains[n]["points"] for n in loader.domain_names], dtype=float)
    np.testing.assert_allclose(loader.stream.probabilities, points / points.sum())
    n = 20_000
    p = points / points.sum()
    np.testing.assert_array_less(np.abs(row_fractions(loader, n) - p), 4 * np.sqrt(p * (1 - p) / n))


def test_bad_configuration_names_field_and_value(corpus):
    with pytest.raises(DataError, match=r"mixture_weights.retail = 1.0: no domain of that name .*'energy'"):
        build_train_loader(config(corpus, mixture_weights={"energy": 1.0, "retail": 1.0}))
    with pytest.raises(DataError, match="global_batch_size = 6: must be a positive multiple of dp_size"):
        build_train_loader(config(corpus), 0, 4, 6, 1)
    with pytest.raises(DataError, match="window_mode = 'sliding': choose one of"):
        config(corpus, window_mode="sliding")
