"""Trees of Hugging Face ``datasets`` ``save_to_disk`` directories, GIFT-Eval's layout (its benchmark, its
non-leaking pretraining corpus, LOTSA): every ``save_to_disk`` directory under ``--input``, found as
``data_prep.gift_eval`` finds GIFT-Eval's configurations, is a dataset named by its path below ``--input``
(``electricity/15T``, ``m4_weekly``), read with ``datasets.load_from_disk``.

Rows: ``target``, a list of numbers (one series) or a list of lists (one series per variate, ``<item_id>_dim<k>``
as GIFT-Eval's ``MultivariateToUnivariate`` names them; variates may differ in length); ``item_id`` (else the row
number); ``freq``, kept as written (``15T``, ``W-SAT``), the same in every row. Other fields (``start``, dynamic
features) are ignored; a null point is a gap for cleaning, a null target an error.

Domain, in this order: the ``--domain-map`` JSON file, ``{"<path or leading folder>": "<domain>", "*": "<domain>"}``
(the longest key that is the dataset's path or one of its leading folders wins; ``*`` covers the rest, and a dataset
nothing covers is an error, so that a mapping never mislabels silently); else the top-level folder when it is one of
the corpus domains (``energy/electricity/15T``: domain ``energy``, dataset ``electricity/15T``); else ``--domain``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.errors import PrepError
from data_prep.gift_eval import find_configurations
from data_prep.index import IndexedDataset, Stager
from data_prep.leakage import LeakageGuard
from data_prep.sources.base import DOMAINS, DatasetSpec, Discovery, check_domain

DEFAULT_KEY = "*"
BATCH_ROWS = 1024  # rows read at a time: a LOTSA dataset can be larger than memory


def _ignored(root: Path, datasets: list[Path]) -> list[dict[str, str]]:
    """The files under ``root`` outside every dataset directory, as the manifest lists input that is not data."""
    inside = set(datasets)
    ignored = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(folder, d) not in inside)
        if Path(folder) not in inside:
            ignored += [{"file": str(Path(folder, f)), "reason": "not in a save_to_disk directory"}
                        for f in sorted(files) if not f.startswith(".")]
    return ignored


def read_domain_map(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except OSError as e:
        raise PrepError(path, "--domain-map", str(path), f"not readable: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PrepError(path, "json", f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}") from None
    if not isinstance(mapping, dict):
        raise PrepError(path, "--domain-map", type(mapping).__name__, 'must be a JSON object {"<path>": "<domain>"}')
    for key, domain in mapping.items():
        if domain not in DOMAINS:
            raise PrepError(path, key, domain, f"not a domain; choose one of {', '.join(DOMAINS)}")
    return {key.strip("/"): domain for key, domain in mapping.items()}


@dataclass(frozen=True)
class HfDiskSource:
    input: str
    domain: str = "other"  # for datasets neither the map nor their top-level folder names
    domain_map: str | None = None  # a JSON file, see the module docstring
    name: str = "hf-disk"

    def __post_init__(self) -> None:
        check_domain(self.domain)

    def _mapping(self) -> dict[str, str] | None:
        return None if self.domain_map is None else read_domain_map(self.domain_map)

    def describe(self) -> dict[str, Any]:
        # The mapping's content, not its path: an edited map is other options (and never reuses a finished corpus).
        return {"name": self.name, "input": str(Path(self.input).resolve()), "domain": self.domain,
                "domain_map": self._mapping()}

    def _place(self, rel: str, mapping: dict[str, str] | None) -> tuple[str, str]:
        parts = rel.split("/")
        if mapping is not None:
            for k in range(len(parts), 0, -1):
                if "/".join(parts[:k]) in mapping:
                    return mapping["/".join(parts[:k])], rel
            if DEFAULT_KEY in mapping:
                return mapping[DEFAULT_KEY], rel
            raise PrepError(self.domain_map, "dataset", rel, f'no key covers it; add it (or a "{DEFAULT_KEY}" '
                                                             "entry) to the domain map")
        if parts[0] in DOMAINS:
            return parts[0], "/".join(parts[1:]) or parts[0]
        return self.domain, rel

    def discover(self) -> Discovery:
        root = Path(self.input)
        try:
            found = find_configurations(root)  # GIFT-Eval's layout: the benchmark's own discovery
        except PrepError as e:
            raise PrepError(e.file, "--input", e.value, e.problem) from None
        mapping = self._mapping()
        specs: dict[str, DatasetSpec] = {}
        for config in found:
            folder = config.path
            domain, dataset = self._place(config.name, mapping)
            files = tuple(str(p) for p in sorted(folder.iterdir()) if p.is_file())
            spec = DatasetSpec(domain, dataset, "hf-disk", files)
            if spec.key in specs:
                other = Path(specs[spec.key].files[0]).parent
                raise PrepError(folder, "dataset", spec.key, f"name also used by {other}")
            specs[spec.key] = spec
        return Discovery(sorted(specs.values(), key=lambda s: s.key), _ignored(root, [c.path for c in found]))

    def index(self, spec: DatasetSpec, folder: Path, guard: LeakageGuard) -> IndexedDataset:
        path = Path(spec.files[0]).parent
        stager = Stager(folder, spec.domain, spec.dataset, guard)
        try:
            freqs: set[str] = set()
            for item_id, values, freq in read_rows(path):
                stager.add(item_id, values)
                freqs.update(freq)
            if len(freqs) > 1:
                raise PrepError(path, "freq", sorted(freqs)[:3], "rows disagree: one frequency per dataset")
            return stager.finish(freq=freqs.pop() if freqs else None)
        except BaseException:
            stager.abort()
            raise


def load_table(path: Path) -> pa.Table:
    """The rows of one ``save_to_disk`` directory, memory-mapped."""
    import datasets

    try:
        return datasets.load_from_disk(str(path)).data.table
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise PrepError(path, "save_to_disk", str(path), f"not readable by datasets.load_from_disk: {e}") from None


def _numeric_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type))


def read_rows(path: Path) -> Iterator[tuple[str, np.ndarray, set[str]]]:
    """(item id, float64 points, {freq} or {}) of every series of the directory, variates one by one."""
    table = load_table(path)
    if "target" not in table.column_names:
        raise PrepError(path, "target", None, f"missing; the fields are {table.column_names}")
    if table.num_rows == 0:
        raise PrepError(path, "rows", 0, "the dataset has no rows")
    kind = table.schema.field("target").type
    multivariate = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _numeric_list(kind.value_type)
    if not (multivariate or _numeric_list(kind)):
        raise PrepError(path, "target", str(kind), "expected a list of numbers or a list of such lists (one per "
                                                   "variate)")
    has_ids, has_freq = "item_id" in table.column_names, "freq" in table.column_names
    row = 0
    for batch in table.select([c for c in ("item_id", "freq", "target") if c in table.column_names]).to_batches(
            BATCH_ROWS):
        target = batch.column("target")
        if target.null_count:
            bad = row + int(np.flatnonzero(target.is_null().to_numpy(zero_copy_only=False))[0])
            raise PrepError(path, f"row {bad}: target", None, "missing (null)")
        ids = batch.column("item_id").to_pylist() if has_ids else range(row, row + batch.num_rows)
        freqs = batch.column("freq").to_pylist() if has_freq else [None] * batch.num_rows
        if multivariate:
            counts = pc.list_value_length(target).to_numpy(zero_copy_only=False)
            variates = pc.list_flatten(target)
            if variates.null_count:
                at = int(np.flatnonzero(variates.is_null().to_numpy(zero_copy_only=False))[0])
                r = int(np.searchsorted(np.cumsum(counts), at, side="right"))
                raise PrepError(path, f"row {row + r}: target[{at - int(np.sum(counts[:r]))}]", None,
                                "missing variate (null)")
        else:
            counts, variates = None, target
        lengths = pc.fill_null(pc.list_value_length(variates), 0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(variates).cast(pa.float64()).to_numpy(zero_copy_only=False)
        series = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
        k = 0
        for r in range(batch.num_rows):
            item_id, freq = str(ids[r]), {freqs[r]} if freqs[r] is not None else set()
            if counts is None:
                yield item_id, series[k], freq
                k += 1
                continue
            for dim in range(int(counts[r])):
                yield f"{item_id}_dim{dim}", series[k], freq
                k += 1
        row += batch.num_rows
