"""``timemoe-prep audit CORPUS --benchmark gift-eval:DIR``: how many of GIFT-Eval's test windows a prepared corpus
holds, per configuration and term, found by content as the leakage guard finds them (``data_prep.gift_leakage``).

Prints a table and writes the result to ``CORPUS/leakage_audit.json`` (keyed by each configuration's digest, for
the corpus whose manifest it names), where ``timemoe-export`` and ``timemoe-eval gift-eval`` read it to declare
``testdata_leakage``; ``--json FILE`` writes it there too (a read-only corpus, or for the record).

A window counts as held when a corpus series holds any of its points.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from data_prep.corpus_manifest import MANIFEST_NAME, load_manifest, shard_paths
from data_prep.errors import PrepError
from data_prep.gift_leakage import (AUDIT_NAME, KIND, benchmark_spec, build_index, check_data, configurations,
                                    read_audit, test_windows_index)
from data_prep.inspect import text_table
from data_prep.pipeline import run_jobs
from data_prep.shards import read_shard, sha256_file

EXAMPLES = 3  # corpus series named per configuration


def _shard_windows(shard: str, roots: tuple[str, ...], index: str) -> tuple[set, dict[str, list[str]]]:
    """The (reference, term, window) triples one shard holds, and the ids of its series that hold any, by
    configuration."""
    windows = test_windows_index(roots, index)
    held, holders = set(), defaultdict(list)
    for batch in read_shard(shard).to_batches():
        target = batch.column("target")
        lengths = pc.list_value_length(target).to_numpy()
        values = np.split(pc.list_flatten(target).to_numpy(), np.cumsum(lengths)[:-1])
        for item_id, series in zip(batch.column("item_id").to_pylist(), values):
            found = windows.windows_held(series)
            held |= found
            for config in sorted({windows.references[ref].config for ref, _, _ in found}):
                holders[config].append(item_id)
    return held, dict(holders)


def audit(corpus: Path, roots: tuple[str, ...], workers: int = 1, progress: bool = True) -> dict:
    """The audit record of ``corpus`` against the GIFT-Eval directories ``roots`` (see the module docstring)."""
    manifest = load_manifest(corpus)
    shards = [str(p) for p in shard_paths(corpus, manifest)]
    held, holders = set(), defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="timemoe-audit-") as tmp:
        build_index(roots, Path(tmp), progress)
        jobs = [(shard, roots, tmp) for shard in shards]
        pool = None
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            with tqdm(total=len(shards), unit="shard", desc="audit", disable=not progress) as bar:
                for _, (shard_held, shard_holders) in run_jobs(pool, _shard_windows, jobs):
                    bar.update(1)
                    held |= shard_held
                    for config, ids in shard_holders.items():
                        holders[config] += ids
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        references = test_windows_index(roots, tmp).references
    found = defaultdict(lambda: defaultdict(set))  # config -> term -> {(reference, window)}
    for ref, term, k in held:
        found[references[ref].config][term].add((ref, k))
    configs = {}
    for root in roots:
        for c in configurations(root):
            terms = {}
            for term, _, w in c.terms:
                pairs = found[c.name][term]
                terms[term] = {"windows": w * len(c.references), "found": len(pairs),
                               "series": len({ref for ref, _ in pairs})}
            configs[c.name] = {"sha256": c.digest, "terms": terms,
                               "windows": sum(t["windows"] for t in terms.values()),
                               "found": sum(t["found"] for t in terms.values()),
                               "corpus_series": len(holders.get(c.name, [])),
                               "examples": sorted(holders.get(c.name, []))[:EXAMPLES]}
    return {"kind": KIND, "data": [Path(r).name for r in roots], "corpus": str(corpus),
            "manifest_sha256": sha256_file(corpus / MANIFEST_NAME), "configs": configs,
            "totals": {"windows": sum(c["windows"] for c in configs.values()),
                       "found": sum(c["found"] for c in configs.values())}}


def table(record: dict) -> str:
    header = ["configuration", "term", "windows", "found", "series"]
    rows = [[name, term, f"{t['windows']:,}", f"{t['found']:,}", f"{t['series']:,}"]
            for name, c in record["configs"].items() for term, t in c["terms"].items()]
    rows.append(["total", "", f"{record['totals']['windows']:,}", f"{record['totals']['found']:,}", ""])
    return text_table(header, rows, labels=2)


def write_audit(corpus: Path, record: dict) -> Path:
    """Merge ``record`` into ``CORPUS/leakage_audit.json``: by configuration digest, for this manifest only (an
    audit of a corpus since prepared again is dropped)."""
    path = corpus / AUDIT_NAME
    kept = {"manifest_sha256": record["manifest_sha256"], KIND: read_audit(corpus, record["manifest_sha256"])}
    for name, c in record["configs"].items():
        kept[KIND][c["sha256"]] = {"config": name, **{k: v for k, v in c.items() if k != "sha256"}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="timemoe-prep audit", description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path, help="a folder timemoe-prep wrote (manifest.json and shards)")
    p.add_argument("--benchmark", type=benchmark_spec, required=True, action="append", metavar=f"{KIND}:DIR",
                   help="GIFT-Eval's data: one save_to_disk directory per configuration (repeatable)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--workers", type=int, default=1, help="processes reading shards")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers}: must be >= 1")
    if not (args.corpus / MANIFEST_NAME).is_file():
        raise PrepError(args.corpus / MANIFEST_NAME, "CORPUS", str(args.corpus), "missing: not a finished "
                                                                                 "timemoe-prep output")
    for root in args.benchmark:
        check_data(root)
    record = audit(args.corpus, tuple(dict.fromkeys(args.benchmark)), args.workers, not args.no_progress)
    print(table(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    try:
        where = f"written to {write_audit(args.corpus, record)}"
    except OSError as e:
        where = (f"not written into the corpus ({e.strerror or e}): timemoe-export and timemoe-eval will not find it"
                 + (f"; kept in {args.json}" if args.json else ""))
        print(f"timemoe-prep audit: {where}", file=sys.stderr)
    totals = record["totals"]
    print(f"audit: {totals['found']:,} of {totals['windows']:,} GIFT-Eval test windows found in {args.corpus} "
          f"({where})")
    return 0
