"""Windows, packing, masks and normalisation of the rows the loader builds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from test_data_shards import write_corpus

from timemoe_train.data import DataConfig, build_train_loader
from timemoe_train.data.windows import pack
from timemoe_train.model.config import TimeMoeConfig
from timemoe_train.model.modeling import TimeMoeForPrediction


def global_rows(path, n_rows: int, **cfg) -> dict[str, torch.Tensor]:
    loader = build_train_loader(DataConfig(path=str(path), num_workers=0, **cfg), global_batch_size=n_rows,
                                micro_batch_size=n_rows)
    return next(iter(loader))


def labelled_transitions(batch) -> Counter:
    """(sequence, t) of every trained pair (x_t -> x_t+1) in rows whose values encode sequence·1000 + t."""
    inputs, labels = batch["inputs"][batch["loss_mask"]], batch["labels"][batch["loss_mask"]]
    assert torch.equal(labels, inputs + 1), "a labelled pair crosses a sequence boundary or skips a point"
    return Counter((int(v) // 1000, int(v) % 1000) for v in inputs)


@pytest.mark.parametrize("packing", [True, False])
def test_stride_windows_train_every_transition_once_per_epoch(tmp_path, packing):
    lengths = [1, 2, 5, 16, 17, 30, 33, 50, 64]
    series = [("energy", "e", 1000.0 * s + np.arange(n)) for s, n in enumerate(lengths)]
    path = write_corpus(tmp_path, series)
    loader = build_train_loader(DataConfig(path=str(path), max_length=16, packing=packing, num_workers=0))
    units = loader.stream.groups[0].num_units
    seen = labelled_transitions(global_rows(path, units, max_length=16, packing=packing, normalization="none"))
    expected = Counter((s, t) for s, n in enumerate(lengths) for t in range(n - 1))
    assert seen == expected
    # Next epoch: the same transitions again, in another order.
    two_epochs = global_rows(path, 2 * units, max_length=16, packing=packing, normalization="none")
    second = {k: v[units:] for k, v in two_epochs.items()}
    assert labelled_transitions(second) == expected
    assert not torch.equal(second["inputs"], two_epochs["inputs"][:units])


def test_pack_fills_bins_with_every_piece_once():
    # Tails of long series are spread evenly over [2, W): random-order next-fit would leave bins 75% full.
    lengths = np.random.default_rng(4).integers(2, 4097, 20_000)
    order, starts = pack(lengths, 4097)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    totals = np.add.reduceat(lengths[order], starts[:-1])
    assert totals.max() <= 4097 and np.all(np.diff(starts) > 0)
    assert lengths.sum() / (4097 * len(totals)) > 0.95


def zscore(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / x.std()


def test_packing_masks_at_boundaries_and_padding(tmp_path):
    a, b, c = np.array([1.0, 2, 4, 8, 16]), np.array([-3.0, 0, 3, 9]), np.array([5.0, 7, 6])
    path = write_corpus(tmp_path, [("energy", "e", a), ("energy", "e", b), ("web", "w", c)], num_shards=1)
    batch = global_rows(path, 6, max_length=14)  # W = 15: a and b share a row, c has one of its own
    energy = batch["domain_ids"][:, 0] == 0
    row = {k: v[energy][0] for k, v in batch.items()}
    first, second = (a, b) if np.isclose(row["inputs"][0], zscore(a)[0]) else (b, a)
    n1, n2 = len(first), len(second)
    values = np.concatenate([zscore(first), zscore(second), np.zeros(15 - n1 - n2)]).astype(np.float32)
    ids = np.array([0] * n1 + [1] * n2 + [-1] * (15 - n1 - n2))
    torch.testing.assert_close(row["inputs"], torch.from_numpy(values[:-1]))
    torch.testing.assert_close(row["labels"], torch.from_numpy(values[1:]))
    assert row["sequence_ids"].tolist() == ids[:-1].tolist()
    t = np.arange(14)
    assert row["loss_mask"].tolist() == ((t < n1 - 1) | ((t >= n1) & (t < n1 + n2 - 1))).tolist()
    assert row["domain_ids"].tolist() == [0] * (n1 + n2) + [-1] * (14 - n1 - n2)

    web = {k: v[~energy][0] for k, v in batch.items()}
    assert web["domain_ids"].tolist() == [1] * 3 + [-1] * 11
    assert web["loss_mask"].tolist() == [True, True] + [False] * 12
    torch.testing.assert_close(web["inputs"][:3], torch.from_numpy(zscore(c).astype(np.float32)))


def test_packed_sequences_do_not_see_each_other(tmp_path):
    """Through the real model: changing the first packed series leaves every prediction for the second unchanged,
    and those equal the predictions for the second series alone."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(size=12)
    path = write_corpus(tmp_path / "a", [("energy", "e", a), ("energy", "e", b)], num_shards=1)
    row = global_rows(path, 1, max_length=40)
    first_len = int((row["sequence_ids"][0] == 0).sum())
    first, second = (a, b) if first_len == len(a) else (b, a)
    changed = [first * 5 + rng.normal(size=len(first)), second]
    changed_path = write_corpus(tmp_path / "b", [("energy", "e", s) for s in (changed if first is a else changed[::-1])],
                                num_shards=1)
    changed_row = global_rows(changed_path, 1, max_length=40)
    assert torch.equal(row["sequence_ids"], changed_row["sequence_ids"])

    torch.manual_seed(0)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny")).eval()
    with torch.no_grad():
        def predict(r):
            out = model(r["inputs"], r["labels"], r["loss_mask"], r["sequence_ids"])
            assert torch.isfinite(out.loss)
            return out.predictions

        packed, repacked = predict(row), predict(changed_row)
        alone = model(torch.from_numpy(zscore(second)[:-1].astype(np.float32))[None]).predictions
    n1, n2 = len(first), len(second)
    for head, head_changed, head_alone in zip(packed, repacked, alone):
        assert not torch.allclose(head[0, :n1], head_changed[0, :n1])
        torch.testing.assert_close(head[0, n1:n1 + n2 - 1], head_changed[0, n1:n1 + n2 - 1], rtol=0, atol=0)
        torch.testing.assert_close(head[0, n1:n1 + n2 - 1], head_alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", ["sequence", "window", "none"])
def test_normalisation_of_the_windows_of_a_long_series(tmp_path, normalization):
    x = np.random.default_rng(2).gamma(2.0, 3.0, size=100).astype(np.float32)
    path = write_corpus(tmp_path, [("energy", "e", x)], num_shards=1)
    rows = global_rows(path, 7, max_length=16, normalization=normalization)  # 6 windows + a 4-point tail
    offsets = range(0, 81, 16)
    expected = {o: {"sequence": (x[o:o + 17] - x.mean(dtype=np.float64)) / x.std(dtype=np.float64),
                    "window": zscore(x[o:o + 17]), "none": x[o:o + 17]}[normalization] for o in offsets}
    found = []
    for inputs, labels in zip(rows["inputs"], rows["labels"]):
        window = np.concatenate([inputs.numpy(), labels.numpy()[-1:]])
        found += [o for o in offsets if np.allclose(window, expected[o], rtol=1e-5, atol=1e-5)]
    assert sorted(found) == list(offsets)


def test_window_statistics_can_leave_out_the_targets_past_the_context(tmp_path):
    """normalization_excludes=5: each 17-point window is scaled by its first 12 points, as forecast() scales a
    context; the 4-point tail keeps half of itself (2 points). Computed here from the raw series."""
    x = np.random.default_rng(3).gamma(2.0, 3.0, size=100).astype(np.float32)
    path = write_corpus(tmp_path, [("energy", "e", x)], num_shards=1)
    rows = global_rows(path, 7, max_length=16, normalization="window", normalization_excludes=5)

    def scaled(piece, kept):
        ref = np.asarray(piece[:kept], np.float64)
        return (piece - ref.mean()) / ref.std()
    expected = {o: scaled(x[o:o + 17], 12) for o in range(0, 81, 16)}
    found, tails = [], 0
    for inputs, labels, mask in zip(rows["inputs"], rows["labels"], rows["loss_mask"]):
        window = np.concatenate([inputs.numpy(), labels.numpy()[-1:]])
        found += [o for o, e in expected.items() if np.allclose(window, e, rtol=1e-5, atol=1e-5)]
        if mask.sum() == 3:  # the row holding the 4-point tail x[96:100]
            np.testing.assert_allclose(np.concatenate([inputs[:1], labels[:3]]), scaled(x[96:], 2), rtol=1e-5,
                                       atol=1e-5)
            tails += 1
    assert sorted(found) == sorted(expected) and tails == 1
    assert not np.allclose(expected[0], zscore(x[:17]))  # the setting changes what the model sees
    with pytest.raises(ValueError, match="normalization_excludes.*-1"):
        DataConfig(path=str(path), normalization_excludes=-1)
    with pytest.raises(ValueError, match="normalization_excludes.*'sequence'"):
        DataConfig(path=str(path), normalization="sequence", normalization_excludes=64)


def test_random_windows_are_full_and_move_each_epoch(tmp_path):
    lengths = [40, 70, 5]
    series = [("energy", "e", 1000.0 * s + np.arange(n)) for s, n in enumerate(lengths)]
    path = write_corpus(tmp_path, series, num_shards=1)
    cfg = dict(max_length=16, window_mode="random", normalization="none")
    loader = build_train_loader(DataConfig(path=str(path), num_workers=0, **cfg))
    units = loader.stream.groups[0].num_units
    # Stride mode cuts 40 -> 2 windows + tail, 70 -> 4 + tail, 5 -> 1 piece: random mode keeps the counts.
    assert units == 3 + 5 + 1
    epochs = global_rows(path, 3 * units, **cfg)
    starts = []
    for e in range(3):
        inputs = epochs["inputs"][e * units:(e + 1) * units]
        full = inputs[epochs["sequence_ids"][e * units:(e + 1) * units].eq(0).all(1)]
        assert len(full) == 8
        starts.append(sorted(full[:, 0].tolist()))
        seq = full[:, 0] // 1000
        offset = full[:, 0] % 1000
        assert torch.all(offset <= torch.tensor([lengths[int(s)] - 17 for s in seq]))
        assert torch.equal(full, full[:, :1] + torch.arange(16.0))
    assert starts[0] != starts[1] or starts[1] != starts[2]
