"""GIFT-Eval's test windows kept out of a corpus (``timemoe-prep --exclude-benchmark gift-eval:DIR``) and counted in
a prepared one (``timemoe-prep audit CORPUS --benchmark gift-eval:DIR``), by content, never by name.

What is guarded: in every configuration under DIR, each variate's *test stretch*, the points GIFT-Eval scores: the
last ``windows × prediction length`` of its longest term, as ``data_prep.gift_eval`` (GIFT-Eval's protocol) sets
them (every term's windows end where the series ends, so the longest term's stretch holds them all). Stretches are
found by ``data_prep.span_match``; one shorter than ``EVIDENCE`` points (an M4 yearly series' 6) is matched together
with the history just before it, so that it is found wherever its series was copied; only its test points are cut.
A corpus series holding only that history (GIFT-Eval's own pretraining corpus) holds no test point and is left
alone.

Cut, not drop: the points of a corpus series aligned with a test stretch are removed and the pieces around them kept
(``<id>@<start>``; cleaning then drops those shorter than ``--min-length``), as GIFT-Eval's pretraining corpus keeps
the history of its test series. The manifest lists each cut series under ``excluded`` with ``cut``, its
``[start, stop)`` ranges, and the configurations whose windows they held.

Digest, per configuration: sha256 over its terms' (name, prediction length, windows) and each variate's length and
test stretch as float32: what the guard removes. ``timemoe-eval gift-eval`` compares the configurations it scores
with the digests the model's corpus was guarded against or audited for (``timemoe_train.evaluate.leakage``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import gift_eval as protocol
from data_prep.errors import PrepError
from data_prep.span_match import EVIDENCE, Match, SpanIndex

KIND = "gift-eval"
AUDIT_NAME = "leakage_audit.json"  # beside a corpus's manifest.json: what `timemoe-prep audit` found in it
_META = "meta.json"


@dataclass(frozen=True)
class Reference:
    """One variate's guarded stretch: its last ``length`` points, of which the last ``test`` are scored."""

    config: str
    item: str
    series_length: int
    length: int
    test: int


@dataclass
class _Config:
    name: str
    terms: list[tuple[str, int, int]]  # (term, prediction length, windows)
    digest: str
    stretches: list[np.ndarray]  # float32, one per variate, the guarded stretch (test stretch + any history before)
    references: list[Reference]


def benchmark_spec(text: str) -> str:
    """'gift-eval:DIR' -> DIR, resolved (the one kind of benchmark ``--exclude-benchmark`` and ``--benchmark``
    know)."""
    kind, sep, path = text.partition(":")
    if kind != KIND or not sep or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {KIND}:DIR (GIFT-Eval's data folder)")
    return str(Path(path).resolve())


def check_data(path: str | Path) -> None:
    """Bad ``--exclude-benchmark``/``--benchmark`` data: one line naming it."""
    if not Path(path).is_dir():
        raise PrepError(path, "--exclude-benchmark", f"{KIND}:{path}", "no such directory (GIFT-Eval's data, one "
                                                                       "save_to_disk directory per configuration)")
    try:
        protocol.find_configurations(path)
    except PrepError as e:
        raise PrepError(path, "--exclude-benchmark", f"{KIND}:{path}", e.problem) from None


@functools.lru_cache(maxsize=128)
def _config(name: str, path: str, written: int) -> _Config:
    """One configuration's stretches and digest; ``written`` (its ``state.json``'s mtime) keys the cache, so that
    data saved again in place is read again."""
    config = protocol.Configuration(name, Path(path))
    terms = [(term, config.prediction_length(term), config.windows(term)) for term in config.terms]
    longest = max(pl * w for _, pl, w in terms)
    digest = hashlib.sha256(json.dumps(terms).encode())
    stretches, references = [], []
    for series in config.series():
        for item, target in zip(series.names(), series.target_VT):  # per variate, as GIFT-Eval scores them
            test = min(len(target), longest)
            length = min(len(target), max(test, EVIDENCE))
            digest.update(np.int64([len(target), test]).tobytes() + target[len(target) - test:].tobytes())
            stretches.append(target[len(target) - length:])
            references.append(Reference(name, item, len(target), length, test))
    return _Config(name, terms, digest.hexdigest(), stretches, references)


def configurations(root: str | Path, names: list[str] | None = None, progress: bool = False) -> list[_Config]:
    """The configurations under ``root`` (those of ``names``, default all), read once per process."""
    found = [c for c in protocol.find_configurations(root) if names is None or c.name in names]
    bar = tqdm(found, unit="config", desc=f"GIFT-Eval test windows ({Path(root).name})", disable=not progress)
    return [_config(c.name, str(c.path.resolve()), (c.path / "state.json").stat().st_mtime_ns) for c in bar]


def config_digests(root: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """Configuration name -> its digest (see the module docstring), for those of ``names`` (default: all)."""
    return {c.name: c.digest for c in configurations(root, names)}


def describe(root: str | Path) -> dict:
    """The manifest's record of one guarded GIFT-Eval directory: its folder name and each configuration's digest."""
    return {"data": Path(root).resolve().name, "evidence": EVIDENCE,
            "configs": {c.name: {"sha256": c.digest, "variates": len(c.references),
                                 "test_points": sum(r.test for r in c.references),
                                 "terms": {t: {"prediction_length": pl, "windows": w} for t, pl, w in c.terms}}
                        for c in configurations(root)}}


class TestWindows:
    """The index of every guarded stretch of some GIFT-Eval directories, and what a series holds of them."""

    def __init__(self, spans: SpanIndex, references: list[Reference], terms: dict[str, list]) -> None:
        self.spans, self.references, self.terms = spans, references, terms

    @classmethod
    def build(cls, roots: tuple[str, ...]) -> TestWindows:
        configs = [c for root in roots for c in configurations(root)]
        spans = SpanIndex.build(s for c in configs for s in c.stretches)
        return cls(spans, [r for c in configs for r in c.references], {c.name: c.terms for c in configs})

    def save(self, folder: Path) -> None:
        self.spans.save(folder)
        meta = {"references": [r.__dict__ for r in self.references], "terms": self.terms}
        tmp = folder / f"{_META}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / _META)  # last: its presence marks the index complete

    @classmethod
    def load(cls, folder: Path) -> TestWindows:
        meta = json.loads((folder / _META).read_text())
        return cls(SpanIndex.load(folder), [Reference(**r) for r in meta["references"]], meta["terms"])

    def held(self, series: np.ndarray) -> list[tuple[Match, int, int]]:
        """(match, start, stop) for each reference ``series`` holds test points of: its points [start, stop)."""
        found = []
        for m in self.spans.matches(series):
            ref = self.references[m.ref]
            start = max(m.start, m.shift + ref.length - ref.test)
            if start < m.stop:
                found.append((m, start, m.stop))
        return found

    def screen(self, item_id: str, values: np.ndarray) -> tuple[list[tuple[int, int]], dict | None]:
        """The pieces of ``values`` around the test points it holds, and the manifest's record of the cut."""
        held = self.held(values)
        if not held:
            return [(0, len(values))], None
        cuts: list[list[int]] = []
        for _, start, stop in sorted(held, key=lambda h: h[1]):
            if cuts and start <= cuts[-1][1]:
                cuts[-1][1] = max(cuts[-1][1], stop)
            else:
                cuts.append([start, stop])
        edges = [0, *(e for cut in cuts for e in cut), len(values)]
        kept = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a]
        sources = sorted({f"{self.references[m.ref].config} {self.references[m.ref].item}" for m, _, _ in held})
        shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        reason = f"held GIFT-Eval test windows ({shown}): cut " + ", ".join(f"[{a}, {b})" for a, b in cuts)
        return kept, {"item_id": item_id, "reason": reason, "cut": cuts}

    def windows_held(self, series: np.ndarray) -> set[tuple[int, str, int]]:
        """(reference, term, window) of every scored window ``series`` holds any point of."""
        found = set()
        for m, start, stop in self.held(series):
            ref = self.references[m.ref]
            # Series coordinates of the reference: its stretch starts at series_length - length.
            lo = start - m.shift + ref.series_length - ref.length
            hi = stop - m.shift + ref.series_length - ref.length
            for term, pl, w in self.terms[ref.config]:
                for k in range(w):
                    end = ref.series_length - (w - 1 - k) * pl
                    if max(lo, end - pl) < min(hi, end):
                        found.add((m.ref, term, k))
        return found


def build_index(roots: tuple[str, ...], folder: Path, progress: bool = False) -> None:
    """The index of ``roots`` saved under ``folder`` (kept when a finished one of the same data is there)."""
    for root in roots:
        configurations(root, progress=progress)  # read once, with a bar: describe and build use them again
    stamp = json.dumps([describe(root) for root in roots], sort_keys=True)
    if (folder / _META).is_file() and (folder / "data.json").is_file() and (folder / "data.json").read_text() == stamp:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _META).unlink(missing_ok=True)
    (folder / "data.json").write_text(stamp)
    TestWindows.build(roots).save(folder)


def test_windows_index(roots: tuple[str, ...], folder: str | None) -> TestWindows:
    """The index a worker screens with: memory-mapped from ``folder`` when the job built one, else built here; once
    per process (and again when ``folder`` was rebuilt)."""
    if folder is None:
        return _index(roots, None, None)
    return _index(roots, folder, (Path(folder) / _META).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _index(roots: tuple[str, ...], folder: str | None, written: int | None) -> TestWindows:
    return TestWindows.load(Path(folder)) if folder is not None else TestWindows.build(roots)


def read_audit(corpus: str | Path, manifest_sha256: str | None) -> dict[str, dict]:
    """Configuration digest -> what ``timemoe-prep audit`` found of it in ``corpus``, if it audited the corpus whose
    manifest has that sha256 (an audit of a corpus since prepared again says nothing); {} when none did."""
    try:
        kept = json.loads((Path(corpus) / AUDIT_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(kept, dict) or manifest_sha256 is None or kept.get("manifest_sha256") != manifest_sha256:
        return {}
    return kept.get(KIND, {})

