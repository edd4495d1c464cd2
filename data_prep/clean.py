"""Cleaning rules, applied to every sequence in the order listed, each one counted in the manifest.

1. ``trimmed_edges``: leading and trailing NaN/inf points are removed (nothing to interpolate from).
2. ``interpolated_gaps``: an interior run of at most ``max_gap`` NaN/inf points is filled linearly from its two
   finite neighbours (in float64, then rounded to float32 like every output point).
3. ``split_at_gaps``: a longer interior run is removed and the sequence is cut in two there; the pieces get the item
   id ``<id>@<start>``, ``start`` being the index of the piece's first point in the original sequence.
4. ``dropped_short``: a sequence (or piece) shorter than ``min_length`` points is dropped.
5. ``dropped_constant``: a sequence whose points are all equal is dropped (it teaches a forecaster nothing and its
   z-normalisation divides by zero); ``drop_constant=False`` keeps them.

Each rule counts ``count`` (gaps or edge runs for rules 1-3, sequences for 4-5) and ``points`` (points filled for
rule 2, points removed for the others), so ``input points - removed points = output points`` always holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("trimmed_edges", "interpolated_gaps", "split_at_gaps", "dropped_short", "dropped_constant")
# Rules whose points leave the corpus (interpolation adds none and removes none).
REMOVING_RULES = ("trimmed_edges", "split_at_gaps", "dropped_short", "dropped_constant")

Counts = dict[str, dict[str, int]]


@dataclass(frozen=True)
class CleanOptions:
    # Eight points bridge a missing working day in hourly data or a missing quarter-hour block in minute data;
    # longer holes are real outages, and inventing them would teach the model straight lines.
    max_gap: int = 8
    # Shorter series carry too little temporal structure to be worth a training row; 16 keeps every M1/M3 series.
    min_length: int = 16
    drop_constant: bool = True

    def __post_init__(self) -> None:
        if self.max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {self.max_gap}")
        if self.min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {self.min_length}")


def new_counts() -> Counts:
    return {rule: {"count": 0, "points": 0} for rule in RULES}


def add_counts(total: Counts, more: Counts) -> None:
    for rule, c in more.items():
        total[rule]["count"] += c["count"]
        total[rule]["points"] += c["points"]


def _bump(counts: Counts, rule: str, count: int, points: int) -> None:
    counts[rule]["count"] += int(count)
    counts[rule]["points"] += int(points)


def _repair(seq: np.ndarray, max_gap: int, counts: Counts) -> tuple[list[tuple[int, np.ndarray]], bool]:
    """Trim, interpolate and split one sequence holding NaN/inf; returns (start, piece) pairs and whether it split."""
    finite = np.isfinite(seq)
    kept = np.flatnonzero(finite)
    if kept.size == 0:
        _bump(counts, "trimmed_edges", 1, seq.size)
        return [], False
    first, last = int(kept[0]), int(kept[-1])
    lead, trail = first, seq.size - 1 - last
    _bump(counts, "trimmed_edges", (lead > 0) + (trail > 0), lead + trail)
    core = seq[first : last + 1].astype(np.float64)
    bad = ~finite[first : last + 1]
    if not bad.any():
        return [(first, core)], False

    edges = np.diff(np.concatenate(([0], bad.astype(np.int8), [0])))
    run_start, run_stop = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    run_len = run_stop - run_start
    short = run_len <= max_gap
    if short.any():
        fill = np.concatenate([np.arange(a, b) for a, b in zip(run_start[short], run_stop[short])])
        good = np.flatnonzero(~bad)
        core[fill] = np.interp(fill, good, core[good])
        _bump(counts, "interpolated_gaps", short.sum(), run_len[short].sum())
    long = ~short
    if not long.any():
        return [(first, core)], False
    _bump(counts, "split_at_gaps", long.sum(), run_len[long].sum())
    piece_start = np.concatenate(([0], run_stop[long]))
    piece_stop = np.concatenate((run_start[long], [core.size]))
    return [(first + int(a), core[a:b]) for a, b in zip(piece_start, piece_stop)], True


def _repair_batch(values, lengths, ids, max_gap, counts):
    """Repair only the sequences holding NaN/inf; runs of clean sequences between them pass through as views."""
    starts = np.concatenate(([0], np.cumsum(lengths)))
    bad_points = np.flatnonzero(~np.isfinite(values))
    bad_seqs = np.unique(np.searchsorted(starts, bad_points, side="right") - 1)
    parts, out_lengths, out_ids = [], [], []
    prev = 0
    for i in bad_seqs.tolist():
        parts.append(values[starts[prev] : starts[i]])
        out_lengths.append(lengths[prev:i])
        out_ids.extend(ids[prev:i])
        pieces, split = _repair(values[starts[i] : starts[i + 1]], max_gap, counts)
        for start, piece in pieces:
            parts.append(piece)
            out_lengths.append(np.array([piece.size], dtype=np.int64))
            out_ids.append(f"{ids[i]}@{start}" if split else ids[i])
        prev = i + 1
    parts.append(values[starts[prev] :])
    out_lengths.append(lengths[prev:])
    out_ids.extend(ids[prev:])
    return np.concatenate(parts), np.concatenate(out_lengths), out_ids


def clean_batch(
    values: np.ndarray, lengths: np.ndarray, ids: list[str], options: CleanOptions
) -> tuple[np.ndarray, np.ndarray, list[str], Counts]:
    """Clean the concatenated sequences ``values`` (split by ``lengths``); returns float32 values, lengths, ids, counts.

    The common case, finite data, stays vectorised across the whole batch; only sequences holding NaN/inf take the
    per-sequence path.
    """
    counts = new_counts()
    lengths = np.asarray(lengths, dtype=np.int64)
    if not np.isfinite(values).all():
        values, lengths, ids = _repair_batch(values, lengths, ids, options.max_gap, counts)

    keep = lengths >= options.min_length
    _bump(counts, "dropped_short", (~keep).sum(), lengths[~keep].sum())
    if options.drop_constant and keep.any():
        nonempty = lengths > 0
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        constant = np.zeros_like(keep)
        # Segments of reduceat run from one non-empty start to the next, i.e. exactly one sequence each.
        constant[nonempty] = np.minimum.reduceat(values, starts) == np.maximum.reduceat(values, starts)
        constant &= keep
        _bump(counts, "dropped_constant", constant.sum(), lengths[constant].sum())
        keep &= ~constant

    if not keep.all():
        values = values[np.repeat(keep, lengths)]
        ids = [ids[i] for i in np.flatnonzero(keep).tolist()]
        lengths = lengths[keep]
    return values.astype(np.float32, copy=False), lengths, ids, counts
