"""``prepare(source, output)``: the whole job, resumable and deterministic.

1. discover the source's datasets (main process);
2. index them (workers): validate, stage text input, leave out (or cut) what the leakage guard excludes, write
   index arrays under ``<output>/.work/datasets/``;
3. plan the shards from the indexes alone (``data_prep.shard_plan``), so their content never depends on the worker count;
4. build the shards (workers), each written to a temporary name and renamed when complete;
5. write ``manifest.json`` and remove ``.work/``.

An interrupted job re-run with the same source and options reuses finished indexes and shards; the result is the
same, byte for byte, as an uninterrupted run. Bad input is found in step 2, before any shard is written, and
leaves nothing behind that was not there before: no output folder, no ``.work/``; a corpus being replaced
(``overwrite``) is removed only once its successor's input has been read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.build import build_shard, finished_shard
from data_prep.clean import CleanOptions, add_counts, new_counts
from data_prep.errors import PrepError
from data_prep.index import IndexedDataset
from data_prep.leakage import LeakageGuard, default_guard
from data_prep.corpus_manifest import MANIFEST_NAME, build_manifest, write_manifest
from data_prep.shard_plan import plan_shards
from data_prep.shards import TMP_SUFFIX
from data_prep.sources.base import DatasetSpec, Discovery, Source

WORK = ".work"
LOCK = ".timemoe-prep.lock"


@dataclass(frozen=True)
class PrepOptions:
    shard_bytes: int = 256 << 20
    batch_points: int = 4 << 20  # points per record batch: bounds worker memory and the loader's read unit
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    on_error: str = "raise"  # "raise": stop at the first bad dataset; "skip": leave it out and list it
    clean: CleanOptions = field(default_factory=CleanOptions)
    overwrite: bool = False  # discard a finished or unfinished job of other source/options in the output folder
    progress: bool = True
    guard: LeakageGuard = field(default_factory=default_guard)  # the benchmarks no series of any source may copy

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.workers < 1 or self.shard_bytes < 1 or self.batch_points < 1:
            raise ValueError("workers, shard_bytes and batch_points must be positive")

    def identity(self) -> dict[str, Any]:
        """The options that shape the output (the worker count and the progress bar do not), as the manifest's
        ``options`` and ``leakage_guard``: the guard's record holds each benchmark's sha256, so other benchmarks
        (or an edited one) never reuse a finished corpus."""
        return {
            "options": {
                "shard_bytes": self.shard_bytes,
                "batch_points": self.batch_points,
                "on_error": self.on_error,
                "clean": asdict(self.clean),
            },
            "leakage_guard": self.guard.describe(),
        }


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    with open(out / LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepError(out, "--output", str(out), "another timemoe-prep job is writing here") from None
        try:
            yield
        finally:
            (out / LOCK).unlink(missing_ok=True)


def _fingerprint(identity: dict[str, Any], discovery: Discovery) -> str:
    """Identity plus every input file's size and mtime: resuming over changed input would mix two corpora."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for spec in discovery.datasets:
        for name in spec.files:
            stat = os.stat(name) if os.path.exists(name) else None
            digest.update(f"{spec.key}\0{name}\0{stat and stat.st_size}\0{stat and stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _clear_corpus(out: Path) -> None:
    for path in out.glob("shard-*.arrow*"):
        path.unlink()
    (out / MANIFEST_NAME).unlink(missing_ok=True)


def _clear(out: Path) -> None:
    _clear_corpus(out)
    shutil.rmtree(out / WORK, ignore_errors=True)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what `mkdir(parents=True)` creates), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def _kept_work(out: Path) -> bool:
    """Whether an unfinished job left anything worth resuming (a finished index or shard); a job that failed
    before that is discarded without --overwrite, so that the corrected command just runs."""
    datasets = out / WORK / "datasets"
    indexed = datasets.is_dir() and any(IndexedDataset.load(d) is not None for d in datasets.iterdir())
    return indexed or any(out.glob("shard-*.arrow"))


def spec_file(spec: DatasetSpec) -> str:
    """The input a dataset is read from, as error messages name it: its file, or the folder holding its files."""
    if len(spec.files) == 1:
        return spec.files[0]
    return os.path.commonpath(spec.files) if spec.files else spec.key


def _index_one(source: Source, spec: DatasetSpec, folder: Path, skip: bool,
               guard: LeakageGuard) -> IndexedDataset | PrepError:
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted attempt
    try:
        indexed = source.index(spec, folder, guard)
        if not indexed.sequences:
            why = (f"the leakage guard excluded all {len(indexed.excluded)} series (--no-leakage-guard keeps them)"
                   if indexed.excluded else "the input holds no series")
            raise PrepError(spec_file(spec), "sequences", 0, why)
        return indexed
    except PrepError as e:
        if not skip:
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return e


def run_jobs(pool: ProcessPoolExecutor | None, fn: Callable,
             jobs: Iterable[tuple]) -> Iterator[tuple[tuple, Any]]:
    """(args, result) in completion order; the first failure cancels what has not started."""
    if pool is None:
        for args in jobs:
            yield args, fn(*args)
        return
    pending: dict[Future, tuple] = {pool.submit(fn, *args): args for args in jobs}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        for future in pending:
            future.cancel()


def prepare(source: Source, output: str | Path, options: PrepOptions | None = None) -> dict[str, Any]:
    """Pack ``source`` into shards plus ``manifest.json`` under ``output``; returns the manifest.

    With ``workers > 1`` the workers are spawned (forking a process that holds pyarrow's thread pools is unsafe), so
    a calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    options = options or PrepOptions()
    out = Path(output)
    created = _first_missing(out.absolute())
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):  # nothing below runs, and nothing is removed, while another job writes here
        fresh = not (out / WORK).exists()
        try:
            return _prepare(source, out, options)
        except PrepError:
            # Bad input: remove what this call made. An interrupted job (a signal, a crash) is no PrepError and
            # keeps its finished indexes and shards for the re-run; so does a job this call resumed.
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif fresh:
                shutil.rmtree(out / WORK, ignore_errors=True)
                if not (out / MANIFEST_NAME).exists():  # this job's shards (a corpus being replaced keeps its own)
                    _clear_corpus(out)
            raise


def _prepare(source: Source, out: Path, options: PrepOptions) -> dict[str, Any]:
    work = out / WORK
    discovery = source.discover()
    options.guard.read(options.progress)
    identity = {"source": source.describe(), **options.identity()}
    finished = out / MANIFEST_NAME
    if finished.exists() and not work.exists():
        manifest = json.loads(finished.read_text())
        if {key: manifest.get(key) for key in identity} == identity and not options.overwrite:
            return manifest
        if not options.overwrite:
            raise PrepError(finished, "--output", str(out), "holds a corpus made from another source or options; "
                            "pass --overwrite to replace it or choose another folder")
        # replaced once the new input is indexed (below): bad input leaves the old corpus as it was
    fingerprint = _fingerprint(identity, discovery)
    job = work / "job.json"
    if job.exists() and json.loads(job.read_text())["fingerprint"] != fingerprint:
        if not options.overwrite and _kept_work(out):
            raise PrepError(job, "fingerprint", fingerprint[:12], "an unfinished job over other input or "
                            "options is in this folder; pass --overwrite to discard it")
        _clear(out)
    (work / "datasets").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(exist_ok=True)
    job.write_text(json.dumps({"fingerprint": fingerprint, **identity}, indent=1))

    pool = None
    if options.workers > 1:
        pool = ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("spawn"))
    guard = options.guard.ready(work / "leakage-index")  # built once, memory-mapped by every worker
    try:
        indexed, skipped = _index_all(source, discovery, work, pool, options, guard)
        if finished.exists():  # the corpus --overwrite replaces (a job under way has written no manifest)
            _clear_corpus(out)
        shards = _build_all(indexed, out, work, pool, options)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    indexed, skipped = _drop_emptied(indexed, shards, skipped, discovery, options)
    if not indexed:
        raise PrepError(source.describe().get("input", out), "sequences", 0,
                        "no dataset yielded a sequence: " + "; ".join(f"{s['file']}: {s['problem']}"
                                                                      for s in skipped[:3])
                        if skipped else "the source holds no dataset")
    manifest = build_manifest(identity, indexed, shards, skipped, discovery.ignored)
    write_manifest(out, manifest)
    shutil.rmtree(work)
    return manifest


def _index_all(source, discovery, work, pool, options, guard):
    found: dict[int, IndexedDataset | PrepError] = {}
    todo = []
    for i, spec in enumerate(discovery.datasets):
        folder = work / "datasets" / f"{i:05d}"
        done = IndexedDataset.load(folder)
        if done is not None:
            found[i] = done
        else:
            todo.append((source, spec, folder, options.on_error == "skip", guard))
    bar = tqdm(total=len(discovery.datasets), initial=len(found), unit="dataset", desc="index",
               disable=not options.progress)
    with bar:
        for args, result in run_jobs(pool, _index_one, todo):
            found[int(args[2].name)] = result
            bar.update(1)
    indexed, skipped = [], []
    for i, spec in enumerate(discovery.datasets):
        if isinstance(found[i], PrepError):
            skipped.append({"domain": spec.domain, "dataset": spec.dataset, **found[i].as_record()})
        else:
            indexed.append(found[i])
    return indexed, skipped


def _why_emptied(stats: dict[str, Any], clean: CleanOptions) -> str:
    """Why cleaning left nothing of a dataset, from its counts (``data_prep.clean``)."""
    rules = stats["cleaning"]
    nonfinite = rules["trimmed_edges"]["points"] + rules["split_at_gaps"]["points"]
    if nonfinite == stats["input_points"]:
        return f"all {stats['input_sequences']} series are NaN/inf throughout"
    parts = []
    if rules["dropped_short"]["count"]:
        parts.append(f"{rules['dropped_short']['count']} shorter than --min-length {clean.min_length} points")
    if rules["dropped_constant"]["count"]:
        parts.append(f"{rules['dropped_constant']['count']} constant (--keep-constant keeps them)")
    if nonfinite:
        parts.append(f"{nonfinite} NaN/inf points removed first")
    return f"cleaning left none of its {stats['input_sequences']} series: " + ", ".join(parts)


def _drop_emptied(indexed, shards, skipped, discovery, options):
    """Datasets of which cleaning kept no sequence are bad input: the first one stops the job naming its file, or
    with --on-error skip it joins the skipped ones."""
    specs = {spec.key: spec for spec in discovery.datasets}
    kept = []
    for ds in indexed:
        stats = [s["datasets"][ds.key] for s in shards if ds.key in s["datasets"]]
        if sum(s["sequences"] for s in stats):
            kept.append(ds)
            continue
        total = {"input_sequences": sum(s["input_sequences"] for s in stats),
                 "input_points": sum(s["input_points"] for s in stats), "cleaning": new_counts()}
        for s in stats:
            add_counts(total["cleaning"], s["cleaning"])
        error = PrepError(spec_file(specs[ds.key]), "sequences", 0, _why_emptied(total, options.clean))
        if options.on_error == "raise":
            raise error
        skipped.append({"domain": ds.domain, "dataset": ds.dataset, **error.as_record()})
        for s in shards:
            s["datasets"].pop(ds.key, None)
    return kept, skipped


def _build_all(indexed, out, work, pool, options):
    plans = plan_shards(indexed, options.shard_bytes)
    for stale in out.glob(f"shard-*.arrow{TMP_SUFFIX}"):
        stale.unlink()
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        done = finished_shard(out, work, plan.index, len(plans))
        if done is not None:
            results[plan.index] = done
        else:
            todo.append((plan, indexed, out, work, len(plans), options.clean, options.batch_points))
    total = sum(p.points for p in plans)
    initial = sum(plans[i].points for i in results)
    bar = tqdm(total=total, initial=initial, unit="pt", unit_scale=True, desc="shards", disable=not options.progress)
    with bar:
        for args, result in run_jobs(pool, build_shard, todo):
            results[args[0].index] = result
            bar.update(args[0].points)
    return [results[i] for i in range(len(plans))]
