"""One configuration and term -> its test windows, as gluonts' evaluation reads them, with each window's imputed
history (what the forecasters see).

The spans are data_prep.gift_eval's (GIFT-Eval's protocol); every variate of a multivariate target is its own
series. A window's `input` is everything before it, raw (gluonts computes MASE's seasonal error from it); its
`history` is the same points with NaN filled by gluonts' LastValueImputation, which forward-fills and gives leading
NaN the first value present. Filling a prefix that way equals the prefix of the filled series once the prefix holds
one value present, so each series is filled once; a prefix of NaN only is filled by itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import pandas as pd

from data_prep.gift_eval import Configuration, period_freq


@dataclass
class Windows:
    """What gluonts' `evaluate_forecasts` calls test data (`input`, `label`: entries in one order), plus the
    imputed `histories` in that order."""

    config: Configuration
    term: str
    input: list[dict] = field(default_factory=list)
    label: list[dict] = field(default_factory=list)
    histories: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.label)

    def contexts(self, context_length: int) -> list[np.ndarray]:
        """The last `context_length` points of each history (all of it when shorter)."""
        return [h[-context_length:] for h in self.histories]


def windows_of(config: Configuration, term: str) -> Windows:
    """Every window of `config` at `term`, in GIFT-Eval's order (series, variate, window)."""
    from gluonts.transform.feature import LastValueImputation

    impute = LastValueImputation()
    pl = config.prediction_length(term)
    out = Windows(config, term)
    spans = groupby(config.test_spans(term), key=lambda s: s.row)
    freq = period_freq(config.freq)
    with warnings.catch_warnings():  # pandas' notices about the old aliases GIFT-Eval's data is written with
        warnings.simplefilter("ignore", FutureWarning)
        for series, (row, row_spans) in zip(config.series(), spans):
            assert series.row == row
            start = pd.Period(series.start, freq=freq)
            filled = {}
            for span in row_spans:
                target = series.target_VT[span.variate or 0]
                if span.variate not in filled:
                    missing = np.isnan(target)
                    present_from = int(np.argmin(missing)) if not missing.all() else len(target)
                    filled[span.variate] = (impute(target.copy()) if missing.any() else target, present_from)
                values, present_from = filled[span.variate]
                history = values[:span.start] if present_from < span.start else impute(target[:span.start].copy())
                out.input.append({"item_id": span.item_id, "start": start, "target": target[:span.start]})
                out.label.append({"item_id": span.item_id, "start": start + span.start,
                                  "target": target[span.start:span.stop]})
                out.histories.append(np.asarray(history, dtype=np.float32))
    assert all(len(label["target"]) == pl for label in out.label)
    return out
