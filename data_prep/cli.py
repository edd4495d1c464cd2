"""``timemoe-prep``: the command line.

    timemoe-prep --source time300b --input IN --output OUT [--workers N]
    timemoe-prep --source csv|parquet|arrow|tsf --input FILE_OR_DIR --output OUT [--domain D] [--dataset NAME] ...
    timemoe-prep --source embedded --output OUT [--mixups N]
    timemoe-prep --source hf-disk --input DIR --output OUT [--domain-map FILE] [--domain D]   (save_to_disk trees)
    timemoe-prep ... --benchmarks ETTm1.csv [B.csv ...]   (any source: more CSVs no series may copy)
    timemoe-prep ... --exclude-benchmark gift-eval:DIR   (any source: cut out GIFT-Eval's test windows)
    timemoe-prep inspect OUT [--out FILE.png]
    timemoe-prep audit OUT --benchmark gift-eval:DIR   (GIFT-Eval test windows a corpus holds)

Exit status: 0 done, 2 bad input (one line naming the file, field and value) or bad usage, as every timemoe-*
command. Bad input leaves nothing behind that was not there before (an interrupted job keeps its finished work).
"""

from __future__ import annotations

import argparse
import re
import sys

from data_prep.clean import CleanOptions
from data_prep.errors import PrepError
from data_prep.gift_leakage import benchmark_spec
from data_prep.freq import FreqError, canonical_freq
from data_prep.leakage import NO_GUARD, default_guard
from data_prep.pipeline import PrepOptions, prepare
from data_prep.sources import (DOMAINS, EmbeddedSource, HfDiskSource, TableLayout, TableSource, Time300BSource,
                               TsfSource)
from data_prep.sources.mixup import TSMixup

SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256MB' -> 256 * 2**20 bytes; K/M/G/T count in powers of 1024 with or without the i."""
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256MB)")
    number, unit, _ = match.groups()
    scale = 1024 ** ("kmgt".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * scale)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _prep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timemoe-prep",
        description="Pack a time-series corpus into Arrow shards plus manifest.json. "
        "'timemoe-prep inspect DIR' summarises a packed corpus; 'timemoe-prep audit DIR --benchmark gift-eval:DATA' "
        "counts the GIFT-Eval test windows it holds.",
    )
    p.add_argument("--source", required=True,
                   choices=["time300b", "csv", "parquet", "arrow", "tsf", "hf-disk", "embedded"])
    p.add_argument("--input", help="input folder (time300b, hf-disk) or file/folder (csv, parquet, arrow, tsf)")
    p.add_argument("--output", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--workers", type=int, default=PrepOptions().workers, help="processes (default: all cores)")
    p.add_argument("--shard-size", type=parse_size, default="256MB", help="target shard size (default 256MB)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="skip: leave bad datasets out and list them in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus or unfinished job of other input")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--benchmarks", nargs="+", default=[], metavar="CSV",
                   help="evaluation CSVs whose channels must not be trained on: series copying any 128 consecutive "
                        "points of one are left out and listed (added to the ETT names and the shipped ETTh1)")
    p.add_argument("--exclude-benchmark", type=benchmark_spec, action="append", default=[],
                   metavar="gift-eval:DIR",
                   help="GIFT-Eval's data (one save_to_disk directory per configuration): the stretch of any series "
                        "holding a configuration's test windows is cut out, by content, and listed (repeatable)")
    p.add_argument("--no-leakage-guard", action="store_true",
                   help="keep every series, ETT-named ones included (e.g. to fine-tune on a benchmark's own "
                        "training split); the manifest records the guard as off and timemoe-eval warns")
    clean = p.add_argument_group("cleaning (see data_prep/clean.py)")
    clean.add_argument("--max-gap", type=int, default=CleanOptions.max_gap,
                       help="interpolate NaN/inf runs up to this length, split at longer ones (default %(default)s)")
    clean.add_argument("--min-length", type=int, default=CleanOptions.min_length,
                       help="drop sequences shorter than this (default %(default)s)")
    clean.add_argument("--keep-constant", action="store_true", help="keep sequences whose points are all equal")
    embedded = p.add_argument_group("embedded")
    embedded.add_argument("--mixups", type=int, default=TSMixup().num_series,
                          help="TSMixup series drawn from the real sub-daily series (0: none; default %(default)s)")
    t300 = p.add_argument_group("time300b")
    t300.add_argument("--no-denormalize", action="store_true", help="keep values as stored, ignoring mean/std")
    hf = p.add_argument_group("hf-disk (trees of datasets' save_to_disk directories: GIFT-Eval, LOTSA)")
    hf.add_argument("--domain-map", metavar="FILE",
                    help='JSON {"<dataset path or leading folder>": "<domain>", "*": "<domain>"}; without it the '
                         "top-level folder when it names a domain, else --domain")
    table = p.add_argument_group("csv, parquet, arrow, tsf")
    table.add_argument("--domain", choices=DOMAINS, default="other",
                       help="the domain of every series (hf-disk: of those no other rule places)")
    table.add_argument("--dataset", help="one dataset of all input files (default: one per file, named by stem)")
    table.add_argument("--freq", help="frequency as a pandas alias, e.g. h, D, MS (default: inferred)")
    table.add_argument("--id-columns", type=_columns, help="long layout: comma-separated id columns")
    table.add_argument("--timestamp-column")
    table.add_argument("--value-columns", type=_columns, help="comma-separated value columns")
    return p


def _source(args: argparse.Namespace, parser: argparse.ArgumentParser):
    if args.source == "embedded":
        if args.mixups < 0:
            parser.error(f"--mixups {args.mixups}: must be >= 0")
        return EmbeddedSource(mixup=TSMixup(num_series=args.mixups) if args.mixups else None)
    if not args.input:
        parser.error(f"--source {args.source} needs --input")
    if args.source == "time300b":
        return Time300BSource(args.input, denormalize=not args.no_denormalize)
    if args.source == "hf-disk":
        return HfDiskSource(args.input, domain=args.domain, domain_map=args.domain_map)
    if args.source == "tsf":
        return TsfSource(args.input, domain=args.domain, dataset=args.dataset, freq=args.freq)
    layout = TableLayout(args.id_columns, args.timestamp_column, args.value_columns)
    return TableSource(args.source, args.input, args.domain, args.dataset, args.freq, layout)


def _prep(argv: list[str]) -> int:
    parser = _prep_parser()
    args = parser.parse_args(argv)
    for flag, given in (("--benchmarks", args.benchmarks), ("--exclude-benchmark", args.exclude_benchmark)):
        if args.no_leakage_guard and given:
            parser.error(f"--no-leakage-guard and {flag} contradict each other: choose one")
    guard = NO_GUARD if args.no_leakage_guard else default_guard(tuple(args.benchmarks),
                                                                 tuple(args.exclude_benchmark))
    args.freq = canonical_freq(args.freq)  # before anything is read or written
    try:
        options = PrepOptions(
            shard_bytes=args.shard_size,
            workers=args.workers,
            on_error=args.on_error,
            clean=CleanOptions(args.max_gap, args.min_length, not args.keep_constant),
            overwrite=args.overwrite,
            progress=not args.no_progress,
            guard=guard,
        )
    except ValueError as e:
        parser.error(str(e))
    manifest = prepare(_source(args, parser), args.output, options)
    totals = manifest["totals"]
    print(f"{args.output}: {totals['shards']} shards, {totals['sequences']:,} sequences, {totals['points']:,} points")
    for skipped in manifest["skipped"]:
        print(f"skipped {skipped['domain']}/{skipped['dataset']}: {skipped['file']}: {skipped['problem']}")
    cut = sum("cut" in e for e in manifest["excluded"])
    if len(manifest["excluded"]) > cut:
        print(f"leakage guard: left out {len(manifest['excluded']) - cut} series (listed under 'excluded' in "
              "manifest.json)")
    if cut:
        print(f"leakage guard: cut GIFT-Eval test windows out of {cut} series (listed under 'excluded', with "
              "'cut', in manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["audit"]:
            from data_prep.audit import main as audit_main

            return audit_main(argv[1:])
        if argv[:1] == ["inspect"]:
            from data_prep.inspect import main as inspect_main

            return inspect_main(argv[1:])
        return _prep(argv)
    except (PrepError, FreqError) as e:
        print(f"timemoe-prep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
