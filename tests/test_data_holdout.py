"""data.holdout_points: the last N points of every sequence never reach a training batch."""

from __future__ import annotations

import numpy as np
import pytest
from test_data_shards import write_corpus
from test_data_windows import global_rows

from timemoe_train.data import DataConfig, build_train_loader
from timemoe_train.data.errors import DataError

LENGTHS = [3, 8, 20, 33, 50, 64, 100]
HOLDOUT = 8


def positions(batch) -> set[tuple[int, int]]:
    """(sequence, t) of every input or label point in rows whose values encode sequence·1000 + t."""
    seen = set()
    for key in ("inputs", "labels"):
        for v in batch[key][batch["loss_mask"]].tolist():
            seen.add((int(v) // 1000, int(v) % 1000))
    return seen


@pytest.mark.parametrize("window_mode", ["stride", "random"])
def test_held_out_tails_are_never_in_a_training_batch(tmp_path, window_mode):
    series = [("energy", "e", 1000.0 * s + np.arange(n)) for s, n in enumerate(LENGTHS)]
    path = write_corpus(tmp_path, series)
    cfg = dict(max_length=16, window_mode=window_mode, holdout_points=HOLDOUT, normalization="none")
    units = build_train_loader(DataConfig(path=str(path), num_workers=0, **cfg)).stream.groups[0].num_units
    seen = positions(global_rows(path, 8 * units, **cfg))  # several epochs: random offsets move every epoch
    trainable = {(s, t) for s, n in enumerate(LENGTHS) for t in range(n - HOLDOUT)}
    assert seen <= trainable
    held_out = {(s, t) for s, n in enumerate(LENGTHS) for t in range(max(n - HOLDOUT, 0), n)}
    assert not seen & held_out
    if window_mode == "stride":  # and everything before the tail is still trained on
        assert seen == {(s, t) for s, t in trainable if LENGTHS[s] - HOLDOUT >= 2}


def test_holdout_is_left_out_of_sequence_statistics(tmp_path):
    values = np.concatenate([np.arange(40.0), np.full(HOLDOUT, 1e6)])
    path = write_corpus(tmp_path, [("energy", "e", values)])
    batch = global_rows(path, 1, max_length=64, holdout_points=HOLDOUT, normalization="sequence")
    got = batch["inputs"][batch["loss_mask"]].numpy()
    z = (np.arange(40.0) - 19.5) / np.arange(40.0).std()
    assert np.allclose(got, z[:-1], atol=1e-5)


def test_holdout_must_be_a_non_negative_integer():
    with pytest.raises(DataError, match="holdout_points"):
        DataConfig(holdout_points=-1)
