"""`timemoe-forecast MODEL_DIR --input PATH --horizon H`: forecasts of every series of a user's file.

PATH is a wide CSV (a timestamp column and one column per series, named by its column), a long CSV (id, timestamp
and value columns), a Parquet or Arrow table, or a prepared corpus folder; see timemoe-prep for the layouts and
--id-columns / --timestamp-column / --value-columns. The last --context-length points of each series are its
context; each is z-normalised by itself, rolled out and de-normalised (the model's `forecast`). The output is long:
`item_id`, `timestamp` (continuing the input's at its frequency) or `step` (1..H, when it has no timestamps) and
`forecast`, written to --out (.csv or .parquet) or as CSV to stdout. Bad input stops the command with one line
naming the file, field and value (exit 2); the output appears whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data_prep.errors import PrepError
from data_prep.freq import FreqError, canonical_freq
from data_prep.sources.tabular import TableLayout

from .batched import forecast_contexts
from .inputs import Inputs, read_inputs
from .model import BACKENDS, DTYPES, ForecastError, load_model

OUT_SUFFIXES = (".csv", ".parquet")


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="timemoe-forecast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-layout directory (an export, or a released model)")
    p.add_argument("--input", required=True, help="CSV / Parquet / Arrow file, or a prepared corpus folder")
    p.add_argument("--horizon", type=int, required=True, help="points to forecast per series")
    p.add_argument("--context-length", type=int, default=512, help="points of context per series (default 512)")
    p.add_argument("--out", type=Path, default=None, help="FILE.csv or FILE.parquet (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="series per forward pass (default 32)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16" if cuda else "float32")
    p.add_argument("--backend", choices=BACKENDS, default="native",
                   help="native: timemoe-train's model; remote: the directory's own modeling code via transformers")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (pays off for many "
                                                          "batches of one shape)")
    p.add_argument("--no-progress", action="store_true")
    table = p.add_argument_group("tables (as timemoe-prep reads them)")
    table.add_argument("--freq", help="frequency as a pandas alias, e.g. h, D, MS; old spellings (H, T, M) too "
                                      "(default: inferred)")
    table.add_argument("--id-columns", type=_columns, help="long layout: comma-separated id columns")
    table.add_argument("--timestamp-column")
    table.add_argument("--value-columns", type=_columns, help="comma-separated value columns")
    return p


def check_args(args) -> None:
    args.freq = canonical_freq(args.freq)
    for name in ("horizon", "context_length", "batch_size"):
        if getattr(args, name) < 1:
            raise ForecastError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.out is not None:
        if args.out.suffix.lower() not in OUT_SUFFIXES:
            raise ForecastError(f"{args.out}: --out must end in {' or '.join(OUT_SUFFIXES)}")
        if not args.out.parent.is_dir():
            raise ForecastError(f"{args.out}: --out's folder {args.out.parent} does not exist")


def forecast_all(model, inputs: Inputs, horizon: int, batch_size: int, progress: bool) -> np.ndarray:
    """[series, horizon] float32 forecasts, in input order."""
    with tqdm(total=len(inputs.contexts), unit="series", desc="forecast", disable=not progress, file=sys.stderr,
              mininterval=5 if not sys.stderr.isatty() else 0.1) as bar:
        return forecast_contexts(model, [c.values for c in inputs.contexts], [horizon], batch_size, bar)[horizon]


def as_frame(inputs: Inputs, forecasts_NH: np.ndarray) -> pd.DataFrame:
    n, horizon = forecasts_NH.shape
    frame = {"item_id": np.repeat([c.item_id for c in inputs.contexts], horizon)}
    if inputs.timestamps:
        stamps = []
        for c in inputs.contexts:
            future = pd.date_range(c.last_time, periods=horizon + 1, freq=inputs.freq)[1:]
            # prep reads timestamps as UTC; written back without the zone, as most inputs write them
            stamps.append(future.tz_convert(None) if future.tz is not None else future)
        frame["timestamp"] = np.concatenate([s.to_numpy() for s in stamps])
    else:
        frame["step"] = np.tile(np.arange(1, horizon + 1), n)
    frame["forecast"] = forecasts_NH.reshape(-1)
    return pd.DataFrame(frame)


def write(frame: pd.DataFrame, out: Path | None) -> None:
    """All at once, through a temporary file beside `out` renamed over it: never a partial file under its name."""
    if out is None:
        frame.to_csv(sys.stdout, index=False)
        return
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        if out.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> None:
    started = time.perf_counter()
    check_args(args)
    layout = TableLayout(args.id_columns, args.timestamp_column, args.value_columns)
    inputs = read_inputs(args.input, layout, args.freq, args.context_length)
    model = load_model(args.model_dir, args.backend, args.device, args.dtype)
    for note in inputs.notes:  # once both inputs and model are known good: an error stays the only line
        print(f"timemoe-forecast: {note}", file=sys.stderr)
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    with torch.no_grad():
        forecasts = forecast_all(model, inputs, args.horizon, args.batch_size, not args.no_progress)
    write(as_frame(inputs, forecasts), args.out)
    print(f"timemoe-forecast: {len(inputs.contexts)} series x {args.horizon} points "
          f"in {time.perf_counter() - started:.1f} s" + (f" -> {args.out}" if args.out else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ForecastError, PrepError, FreqError) as e:
        print(f"timemoe-forecast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
