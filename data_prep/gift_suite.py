"""A small suite in GIFT-Eval's layout, built from real series that pip packages ship (none of the demo corpus's):
for trying `timemoe-eval gift-eval` without the benchmark's download, and for its tests.

    python -m data_prep.gift_suite OUT_DIR      (needs statsmodels, which the [gift] extra brings, and pmdarima)

| configuration | series | from | frequency | points | why it is here |
|---|---|---|---|---|---|
| co2/W | weekly CO2 at Mauna Loa, 1958-2001 | statsmodels | W-SAT | 2,284, 59 missing | weekly anchored, NaN |
| taylor/30T | half-hourly electricity demand, England and Wales, summer 2000 | pmdarima | 30min | 4,032 | sub-daily: medium and long terms |
| taylor/H | the same, hourly (each hour's two half-hours summed) | pmdarima | h | 2,016 | pandas' new hourly alias |
| msft/D | Microsoft's daily open, high, low and close, 1986-2017, on calendar days | pmdarima | D | 11,566 x 4, 31% missing (market closed) | multivariate, NaN in labels |
| sunspots/M | monthly sunspot numbers, 1749-1983 | pmdarima | M | 2,820 | pandas' old month-end alias |
| elnino/M | monthly sea surface temperature of the El Nino region, 1950-2010 | statsmodels | M | 732 | a short one: 7 windows |

statsmodels marks its three as public domain; pmdarima (MIT) ships taylor (J. W. Taylor, 2003, as R's forecast
package has it), msft and monthly sunspots (SILSO) inside its wheel. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SUITE = ("co2/W", "taylor/30T", "taylor/H", "msft/D", "sunspots/M", "elnino/M")


def _rows() -> dict[str, list[dict]]:
    import statsmodels.api as sm
    from pmdarima.datasets import load_msft, load_sunspots, load_taylor

    co2 = sm.datasets.co2.load_pandas().data["co2"]
    taylor = load_taylor(dtype=np.float64)
    hourly = taylor.reshape(-1, 2).sum(axis=1)
    msft = load_msft()
    days = pd.to_datetime(msft["Date"])
    prices = msft.set_index(days)[["Open", "High", "Low", "Close"]].asfreq("D")
    elnino = sm.datasets.elnino.load_pandas().data.set_index("YEAR")
    summer = pd.Timestamp("2000-06-05")
    return {
        "co2/W": [{"item_id": "co2", "start": co2.index[0], "freq": "W-SAT", "target": co2.to_numpy()}],
        "taylor/30T": [{"item_id": "taylor", "start": summer, "freq": "30min", "target": taylor}],
        "taylor/H": [{"item_id": "taylor", "start": summer, "freq": "h", "target": hourly}],
        "msft/D": [{"item_id": "msft", "start": prices.index[0], "freq": "D", "target": prices.to_numpy().T}],
        "sunspots/M": [{"item_id": "sunspots", "start": pd.Timestamp("1749-01-31"), "freq": "M",
                        "target": load_sunspots(dtype=np.float64)}],
        "elnino/M": [{"item_id": "elnino", "start": pd.Timestamp(f"{int(elnino.index[0])}-01-31"), "freq": "M",
                      "target": elnino.to_numpy().reshape(-1)}],
    }


def save_configuration(path: Path, rows: list[dict]) -> None:
    """One GIFT-Eval configuration: `rows` {item_id, start, freq, target (1-D, or [variates, T])} saved as the
    benchmark's release stores them (float32 targets, NaN for missing points, start in seconds)."""
    import datasets

    multivariate = np.ndim(rows[0]["target"]) == 2
    value = datasets.Value("float32")
    target = datasets.Sequence(datasets.Sequence(value) if multivariate else value)
    features = datasets.Features({"item_id": datasets.Value("string"), "start": datasets.Value("timestamp[s]"),
                                  "freq": datasets.Value("string"), "target": target})
    records = [{**r, "start": pd.Timestamp(r["start"]).to_pydatetime(),
                "target": np.asarray(r["target"], dtype=np.float32).tolist()} for r in rows]
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(path))


def build(out: str | Path) -> list[Path]:
    out = Path(out)
    written = []
    for name, rows in _rows().items():
        save_configuration(out / name, rows)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.gift_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to write the configurations into")
    args = p.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()  # six tiny saves
    try:
        paths = build(args.out)
    except ImportError as e:
        print(f"gift_suite: error: {e.name} is not installed (pip install statsmodels pmdarima)", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} configurations under {args.out}: {', '.join(SUITE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
