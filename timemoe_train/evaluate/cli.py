"""`timemoe-eval MODEL_DIR [MODEL_DIR ...] --csv ETTh1.csv [ETTm1.csv ...]`: the long-horizon benchmark of every
model on every table, next to seasonal-naive and last-value baselines: one combined JSON and Markdown table (MSE,
MAE, MASE), one PNG per dataset with every model. A table is anything timemoe-prep reads (a wide or long CSV, a
Parquet or Arrow file; --id-columns, --date-column, --value-columns, --freq as there); a table whose series differ
in length is one dataset per length. Missing points: each context filled as timemoe-forecast fills it (interior
gaps linearly, from the points up to the context's end alone), missing truth points left out of the metrics.
Each model's training_data.json (written by timemoe-export) says whether each table was kept out of its training
corpus; a WARNING names the pairs where it was not. Bad input: one line naming the file, field and value, exit 2.

`timemoe-eval gift-eval MODEL_DIR --data DIR --out OUT`: GIFT-Eval as its leaderboard scores it (see
`timemoe-eval gift-eval --help`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.freq import FreqError, canonical_freq
from ..cli_types import float_list, int_list, names
from ..forecast import BACKENDS, DTYPES, ForecastError
from .data import DEFAULT_RATIOS
from .leakage import leakage_warnings
from .long_horizon import evaluate_many


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timemoe-eval", description=__doc__)
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                   help="HF-layout directories (config.json + model.safetensors), ours or released; several are "
                        "compared on the same windows, labelled by directory name")
    p.add_argument("--csv", required=True, nargs="+",
                   help="benchmark tables (.csv, .parquet, .arrow, as timemoe-prep reads them); ETTh1/ETTh2/ETTm1/"
                        "ETTm2 stems get their month splits")
    p.add_argument("--columns", type=names, default=None,
                   help="comma-separated channels, named as timemoe-prep names the series (a wide table's columns, "
                        "a long table's ids; default: all)")
    p.add_argument("--date-column", "--timestamp-column", dest="date_column",
                   help="default: the first of timestamp, date, ds, time, datetime present (as timemoe-prep finds "
                        "its timestamp column)")
    p.add_argument("--id-columns", type=names, default=None,
                   help="long layout: comma-separated id columns (default: id, item_id or unique_id when present)")
    p.add_argument("--value-columns", type=names, default=None,
                   help="comma-separated value columns (long layout default: value, target or y)")
    p.add_argument("--freq", help="frequency as a pandas alias, e.g. h, D, MS; old spellings (H, T, M) too "
                                  "(default: inferred)")
    p.add_argument("--horizons", type=int_list, default=[96, 192, 336, 720],
                   help="comma-separated (default: all four of the paper); narrow with e.g. --horizons 96")
    p.add_argument("--context-lengths", type=int_list, default=None,
                   help="one per horizon, or a single one for all (default: the paper's, 512/1024/2048/3072 for "
                        "horizons 96/192/336/720, 512 for any other)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="quick run: N evenly spaced test windows per horizon and channel, first and last included")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--season-length", type=int, default=None,
                   help="seasonal-naive period (default: from the date column's spacing, e.g. 24 for hourly)")
    p.add_argument("--split-ratios", type=float_list, default=list(DEFAULT_RATIOS),
                   help="train,val,test fractions for CSVs other than ETT (default 0.7,0.1,0.2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native: timemoe-train's model; remote: the directory's own modeling code via transformers")
    p.add_argument("--out", type=Path, default=None, help="output directory (default outputs/eval/<csv stem>)")
    p.add_argument("--no-progress", action="store_true")
    return p


PAPER_CONTEXTS = {96: 512, 192: 1024, 336: 2048, 720: 3072}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gift-eval"]:
        from .gift_eval.cli import main as gift_eval

        return gift_eval(argv[1:])
    args = parser().parse_args(argv)
    contexts = args.context_lengths or [PAPER_CONTEXTS.get(h, 512) for h in args.horizons]
    out = args.out or Path("outputs") / "eval" / "_".join(Path(c).stem for c in args.csv)
    models = args.model_dirs[0] if len(args.model_dirs) == 1 else args.model_dirs
    try:
        results = evaluate_many(
            models, args.csv, horizons=args.horizons, context_lengths=contexts,
            columns=args.columns, date_column=args.date_column, id_columns=args.id_columns,
            value_columns=args.value_columns, freq=canonical_freq(args.freq), max_windows=args.max_windows,
            batch_size=args.batch_size, season_length=args.season_length, split_ratios=args.split_ratios,
            device=args.device, dtype=args.dtype, backend=args.backend, out_dir=out, progress=not args.no_progress)
    except (ForecastError, FreqError) as e:  # EvalError is a ForecastError
        print(f"timemoe-eval: error: {e}", file=sys.stderr)
        return 2
    print(Path(results["files"]["markdown"]).read_text())
    for warning in leakage_warnings(results):
        print(f"timemoe-eval: {warning}", file=sys.stderr)
    print("wrote " + ", ".join(results["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
