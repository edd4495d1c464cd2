"""`timemoe-forecast MODEL_DIR --input PATH --horizon H [--out OUT/ | f.csv | f.parquet]`: forecasts of every series
of a user's files, streamed.

PATH is a wide CSV (a timestamp column and one column per series, named by its column), a long CSV (id, timestamp
and value columns), a Parquet or Arrow table, a folder of such files, or a prepared corpus folder; see
timemoe-prep for the layouts and --id-columns / --timestamp-column / --value-columns. The last --context-length
points of each series are its context; each is z-normalised by itself, rolled out and de-normalised (the model's
`forecast`), in batches of similar context lengths. The output is long: `item_id`, `timestamp` (continuing the
input's at its frequency) or `step` (1..H, when it has no timestamps) and `forecast`.

--out OUT/ (a folder): one Parquet file per input shard, or per --series-per-shard series of it, named after it
(`<input file>.<k>-of-<n>.parquet`), each written whole; the input is read one such part at a time, so memory is
set by a part, not by the input. The same command again skips the parts already written (and says how many):
a killed run resumes. --nproc-per-node N splits the parts over N processes (one GPU each where there are GPUs),
the output the same as one process's. Progress goes to stderr and to OUT/_forecast.log.
--out f.csv / f.parquet writes one file, whole or not at all; without --out, CSV goes to stdout.

Bad input stops the command with one line naming the file, field and value (exit 2); parts already written stay.
The last line: `forecast: <n> series × <h> steps in <t> s, <s> series/s on <N> processes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from data_prep.errors import PrepError
from data_prep.freq import FreqError, canonical_freq
from data_prep.sources.tabular import TableLayout

from ..cli_types import names
from ..launch import LAUNCHED, run_torchrun, torchrun_command, write_error_file
from .batched import auto_batch_size, forecast_contexts
from .model import AUTO, BACKENDS, DTYPES, ForecastError, load_model, resolve_dtype
from .output import FILE_SUFFIXES, LOG, ShardFolder, SingleFile, forecast_table
from .progress import Progress
from .stream import Source, find_sources, part_count, part_name, read_parts

PROGRAM = "timemoe-forecast"
# A launched process's tally, in the output folder, read (and removed) by the launching command.
RESULT, RESULTS = ".rank-{:05d}.json", ".rank-*.json"


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-layout directory (an export, or a released model)")
    p.add_argument("--input", required=True, help="CSV / Parquet / Arrow file, a folder of them, or a prepared "
                                                  "corpus folder")
    p.add_argument("--horizon", type=int, required=True, help="points to forecast per series")
    p.add_argument("--context-length", type=int, default=512, help="points of context per series (default 512)")
    p.add_argument("--out", default=None, help="OUT/ (a folder of Parquet shards, resumable), FILE.csv or "
                                               "FILE.parquet (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="series per roll-out (default: as many as ~32 MiB of working memory holds on a CPU, at "
                        "least 8; a quarter of the free memory on a GPU)")
    p.add_argument("--series-per-shard", type=int, default=16384,
                   help="the most series of one output shard, read into memory at once (default 16384)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes, each forecasting its share of the shards (one GPU each where there are "
                        "GPUs; on CPU, OMP_NUM_THREADS defaults to the cores / N); needs --out OUT/")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=(*DTYPES, AUTO), default="bfloat16" if cuda else "float32",
                   help="auto: bfloat16 on a GPU and on a CPU with bf16 matrix units (AMX, AVX512-BF16), where "
                        "forecasts move by <1%% of their scale; float32 elsewhere")
    p.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native: timemoe-train's model; remote: the directory's own modeling code via transformers")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (pays off for many "
                                                          "batches of one shape)")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr (OUT/_forecast.log keeps it)")
    table = p.add_argument_group("tables (as timemoe-prep reads them)")
    table.add_argument("--freq", help="frequency as a pandas alias, e.g. h, D, MS; old spellings (H, T, M) too "
                                      "(default: inferred)")
    table.add_argument("--id-columns", type=names, help="long layout: comma-separated id columns")
    table.add_argument("--timestamp-column")
    table.add_argument("--value-columns", type=names, help="comma-separated value columns")
    return p


def check_args(args) -> None:
    args.freq = canonical_freq(args.freq)
    for name in ("horizon", "context_length", "batch_size", "series_per_shard", "nproc_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ForecastError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def output_of(args) -> ShardFolder | SingleFile:
    if args.out is None:
        sink = SingleFile(None)
    else:
        path = Path(args.out)
        if path.suffix.lower() in FILE_SUFFIXES:
            if not path.parent.is_dir():
                raise ForecastError(f"{path}: --out's folder {path.parent} does not exist")
            sink = SingleFile(path)
        elif path.suffix and not path.is_dir() and not args.out.endswith("/"):
            raise ForecastError(f"{path}: --out must end in {' or '.join(FILE_SUFFIXES)}, or name a folder "
                                "(OUT/) for Parquet shards")
        else:
            sink = ShardFolder(path)
    if args.nproc_per_node > 1 and not isinstance(sink, ShardFolder):
        raise ForecastError(f"--nproc-per-node {args.nproc_per_node}: needs --out OUT/ (a folder), got "
                            f"{args.out or 'stdout'}")
    return sink


def settings(args) -> dict:
    """What a shard folder's forecasts depend on: a re-run must agree to add to them."""
    return {"model": str(Path(args.model_dir).resolve()), "input": str(Path(args.input).resolve()),
            "horizon": args.horizon, "context_length": args.context_length,
            "series_per_shard": args.series_per_shard, "dtype": args.dtype, "backend": args.backend,
            "freq": args.freq, "id_columns": args.id_columns and list(args.id_columns),
            "timestamp_column": args.timestamp_column,
            "value_columns": args.value_columns and list(args.value_columns)}


@dataclass
class Tally:
    series: int = 0
    shards: int = 0
    filled: int = 0
    short: int = 0
    numbered: bool = False  # some forecasts of a corpus or one-row-per-series table, which carry no timestamps
    notes: list[str] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        for name in ("series", "shards", "filled", "short"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.numbered |= other.numbered
        self.notes += [n for n in other.notes if n not in self.notes]


def my_parts(sources: list[Source], finished: set[str], series_per_shard: int, rank: int,
             world: int) -> list[tuple[Source, set[int] | None]]:
    """This process's share: the parts of sources of known rows are dealt round-robin over the processes, each
    other source as a whole; parts already written are left out, and sources with nothing left."""
    units = [(s, j) for s in sources for j in (range(part_count(s.rows, series_per_shard)) if s.rows else [None])]
    out: dict[Source, set[int] | None] = {}
    for u, (source, j) in enumerate(units):
        if u % world != rank:
            continue
        if j is None:
            if not _table_finished(source, finished):
                out[source] = None
        elif part_name(source, j, part_count(source.rows, series_per_shard)) not in finished:
            out.setdefault(source, set()).add(j)
    return list(out.items())


def _table_finished(source: Source, finished: set[str]) -> bool:
    """Whether every part of a source read whole is written: their names say how many it has."""
    prefix = f"{source.path.name}."
    counts = {name[len(prefix):].split("-of-")[1] for name in finished if name.startswith(prefix)}
    if len(counts) != 1:
        return False
    count = int(counts.pop().removesuffix(".parquet"))
    return all(part_name(source, i, count) in finished for i in range(count))


def forecast_parts(model, work, sink, finished: set[str], args, layout: TableLayout, progress: Progress) -> Tally:
    tally = Tally()
    batch_size = args.batch_size or auto_batch_size(model, args.context_length, args.horizon)
    for source, indices in work:
        def wanted(index: int, count: int, source=source, indices=indices) -> bool:
            return (indices is None or index in indices) and part_name(source, index, count) not in finished

        for part in read_parts(source, wanted, args.series_per_shard, args.context_length, layout, args.freq):
            if part.source.kind == "table" and not len(part.contexts):
                raise ForecastError(f"{source.path}: holds no series")
            forecasts_NH = forecast_contexts(model, part.contexts, [args.horizon], batch_size, progress)[args.horizon]
            sink.write(part.name, forecast_table(part, forecasts_NH))
            if isinstance(sink, ShardFolder):
                progress.shard(part.name)
            tally.add(Tally(len(part.contexts), 1, part.filled,
                            int((part.contexts.lengths_N < args.context_length).sum()),
                            part.source.kind != "table", part.notes))
    return tally


def summary(args, tally: Tally, started: float, processes: int) -> None:
    for note in tally.notes:
        print(f"{PROGRAM}: {note}", file=sys.stderr)
    if tally.numbered:
        print(f"{PROGRAM}: {args.input}: a prepared corpus or a table of one row per series has no timestamps: "
              "forecasts are numbered by step 1..H", file=sys.stderr)
    if tally.filled:
        print(f"{PROGRAM}: {args.input}: {tally.filled} missing points inside the contexts filled linearly",
              file=sys.stderr)
    if tally.short:
        print(f"{PROGRAM}: {args.input}: {tally.short} of {tally.series} series are shorter than --context-length "
              f"{args.context_length}: all of each is used", file=sys.stderr)
    seconds = time.time() - started
    print(f"forecast: {tally.series} series × {args.horizon} steps in {seconds:.1f} s, "
          f"{tally.series / seconds:.1f} series/s on {processes} processes", file=sys.stderr, flush=True)


def prepare(args, sink) -> set[str]:
    """The shard folder made or checked; the parts already in it, said once by the launching command."""
    if not isinstance(sink, ShardFolder):
        return set()
    finished = sink.prepare(settings(args))
    if finished and "WORLD_SIZE" not in os.environ:
        series = sum(pq.ParquetFile(sink.folder / name).metadata.num_rows for name in finished) // args.horizon
        print(f"{PROGRAM}: {len(finished)} shards ({series} series) already in {sink.folder}: skipped",
              file=sys.stderr, flush=True)
    return set(finished)


def process_start() -> float:
    """When this process started (wall clock): the last line's time includes the imports (Linux; elsewhere from
    the first call)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def run(args) -> None:
    """This process's share (all of it when not launched), and, when not launched, the last line."""
    started = process_start()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_args(args)
    args.dtype = resolve_dtype(args.dtype, args.device)
    layout = TableLayout(args.id_columns, args.timestamp_column, args.value_columns)
    sink = output_of(args)
    sources = find_sources(args.input)
    finished = prepare(args, sink)
    device = args.device
    if device == "cuda" and world > 1:  # one GPU per process, shared when there are fewer
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    model = load_model(args.model_dir, args.backend, device, args.dtype)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    work = my_parts(sources, finished, args.series_per_shard, rank, world)
    total = None if any(idx is None for _, idx in work) else \
        sum(min(args.series_per_shard, s.rows - j * args.series_per_shard) for s, idx in work for j in idx)
    log = sink.folder / LOG if isinstance(sink, ShardFolder) else None
    progress = Progress(total, not args.no_progress, log, f"[rank {rank} of {world}] " if world > 1 else "")
    try:
        with torch.no_grad():
            tally = forecast_parts(model, work, sink, finished, args, layout, progress)
    except BaseException:
        if isinstance(sink, SingleFile):
            sink.abort()
        raise
    finally:
        progress.close()
    if isinstance(sink, SingleFile):
        sink.close()
    if world > 1 and LAUNCHED in os.environ:
        (sink.folder / RESULT.format(rank)).write_text(json.dumps(asdict(tally)))
    else:
        summary(args, tally, started, world)


def launch(args, argv: list[str]) -> int:
    """--nproc-per-node N: the same command in N processes through timemoe-train's launcher (torchrun), each
    forecasting its share; then their tallies summed into the last line."""
    started = process_start()
    check_args(args)
    args.dtype = resolve_dtype(args.dtype, args.device)
    sink = output_of(args)
    find_sources(args.input)  # a missing input is said once, here
    prepare(args, sink)
    for stale in sink.folder.glob(RESULTS):
        stale.unlink()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    launcher_args = argparse.Namespace(nnodes=None, node_rank=None, nproc_per_node=args.nproc_per_node,
                                       master_addr=None, master_port=None, rdzv_id=None,
                                       module="timemoe_train.forecast.cli", overrides=argv)
    status = run_torchrun(torchrun_command(launcher_args, dict(os.environ))[3:], program=PROGRAM)
    if status:
        return status
    tally = Tally()
    for result in sorted(sink.folder.glob(RESULTS)):
        tally.add(Tally(**json.loads(result.read_text())))
        result.unlink()
    summary(args, tally, started, args.nproc_per_node)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
            return launch(args, argv)
        run(args)
    except (ForecastError, PrepError, FreqError) as e:
        line = f"{PROGRAM}: error: {e}"
        if not write_error_file(line):
            print(line, file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
