"""The roll-out behind every forecast (`timemoe_train.model.rollout`): several horizons from one roll-out equal
separate roll-outs, left-padded rows of different lengths equal each row alone (and the released-style reference:
tests/test_remote_code.py)."""

import numpy as np
import pytest
import torch

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.model.rollout import head_schedule, roll_out


def model_with_live_heads(seed=0):
    torch.manual_seed(seed)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny")).eval()
    with torch.no_grad():  # heads of std 0.3: O(1) forecasts, so what is fed back matters
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
    return model


def walks(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 5.0 + torch.randn(batch, length, generator=g).cumsum(dim=1) * torch.rand(batch, 1, generator=g) * 3


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_head_schedule_is_greedy():
    assert head_schedule(96, [1, 8, 32, 64]) == [3, 2]
    assert head_schedule(720, [1, 8, 32, 64]) == [3] * 11 + [1, 1]
    assert head_schedule(5, [1, 8, 32, 64]) == [0] * 5


def test_one_roll_out_gives_every_horizon_as_separate_roll_outs_do():
    model = model_with_live_heads()
    context_BT = walks(3, 80)
    calls = []
    model.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    together = roll_out(model, context_BT, [96, 192, 336, 720, 5])
    # h720's 13 forwards (context, 11 x 64, 8) plus h336's own last 8 and h5's own four single points.
    assert sorted(calls) == sorted([80] + [64] * 11 + [8] + [8] + [1] * 4)
    for h in (5, 96, 192, 336, 720):
        alone = model.forecast(context_BT, h)
        assert together[h].shape == alone.shape == (3, h)
        torch.testing.assert_close(together[h], alone, atol=1e-5, rtol=1e-5)
    assert (together[720] - context_BT.mean(1, keepdim=True)).abs().max() > 0.1  # the roll-out moves


def test_left_padded_rows_equal_each_row_alone():
    model = model_with_live_heads(seed=4)
    lengths = [50, 17, 33, 1, 50]
    series = [walks(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    padded_BT = torch.full((len(series), T), float("nan"))  # padding never reaches the numbers
    for row, s in zip(padded_BT, series):
        row[T - len(s):] = s
    got = roll_out(model, padded_BT, [40, 96], torch.tensor(lengths))
    for i, s in enumerate(series):
        for h in (40, 96):
            want = model.forecast(s[None], h)[0]
            assert torch.isfinite(got[h][i]).all()
            assert relative(got[h][i], want) <= 1e-5, (i, h)


def test_bad_lengths_are_refused():
    model = model_with_live_heads()
    with pytest.raises(ValueError, match="lengths must be within"):
        roll_out(model, torch.ones(2, 4), [3], torch.tensor([4, 0]))


def test_forecast_contexts_batches_mixed_lengths_in_input_order():
    from timemoe_train.forecast import forecast_contexts

    model = model_with_live_heads(seed=5)
    contexts = [walks(1, n, seed=30 + i)[0].numpy() for i, n in enumerate([12, 70, 12, 45, 3, 70, 69])]
    got = forecast_contexts(model, contexts, [8, 20], batch_size=3)
    for i, c in enumerate(contexts):
        for h in (8, 20):
            want = model.forecast(torch.from_numpy(c)[None], h)[0].numpy()
            assert got[h].shape == (len(contexts), h)
            assert relative(torch.from_numpy(got[h][i]), torch.from_numpy(want)) <= 1e-5, (i, h)


def test_forecast_contexts_gives_a_model_without_padding_one_length_per_batch():
    from timemoe_train.forecast import forecast_contexts

    class OnlyForecast(torch.nn.Module):  # what a remote-code model offers: forecast(context_BT, horizon)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.shapes = inner, []

        def forecast(self, context_BT, horizon):
            self.shapes.append(tuple(context_BT.shape))
            return self.inner.forecast(context_BT, horizon)

    inner = model_with_live_heads(seed=6)
    wrapped = OnlyForecast(inner)
    contexts = [walks(1, n, seed=40 + i)[0].numpy() for i, n in enumerate([9, 30, 9, 9, 30])]
    got = forecast_contexts(wrapped, contexts, [5], batch_size=2)
    assert sorted(wrapped.shapes) == [(1, 9), (2, 9), (2, 30)]  # two of 30 points, three of 9
    want = forecast_contexts(inner, contexts, [5], batch_size=2)
    np.testing.assert_allclose(got[5], want[5], rtol=1e-5, atol=1e-5)
