"""OUT's tables: `all_results.csv` (the model) and `seasonal_naive/all_results.csv`, in the leaderboard's 15 columns
and order, one row per configuration and term keyed `<name>/<freq>/<term>`; and the headline figure, each
model/seasonal-naive ratio of MASE and of CRPS (mean_weighted_sum_quantile_loss) over the rows both tables hold,
geometrically averaged, as the leaderboard ranks models.

Tables are rewritten whole through a temporary file renamed over them after every configuration: an interrupted
run leaves the rows it finished, never a torn one, and a re-run skips them.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

# The leaderboard's metric columns: (column, the key gluonts' evaluation gives it).
METRICS = (
    ("eval_metrics/MSE[mean]", "MSE[mean]"),
    ("eval_metrics/MSE[0.5]", "MSE[0.5]"),
    ("eval_metrics/MAE[0.5]", "MAE[0.5]"),
    ("eval_metrics/MASE[0.5]", "MASE[0.5]"),
    ("eval_metrics/MAPE[0.5]", "MAPE[0.5]"),
    ("eval_metrics/sMAPE[0.5]", "sMAPE[0.5]"),
    ("eval_metrics/MSIS", "MSIS"),
    ("eval_metrics/RMSE[mean]", "RMSE[mean]"),
    ("eval_metrics/NRMSE[mean]", "NRMSE[mean]"),
    ("eval_metrics/ND[0.5]", "ND[0.5]"),
    ("eval_metrics/mean_weighted_sum_quantile_loss", "mean_weighted_sum_quantile_loss"),
)
COLUMNS = ("dataset", "model", *(c for c, _ in METRICS), "domain", "num_variates")
MASE = "eval_metrics/MASE[0.5]"
CRPS = "eval_metrics/mean_weighted_sum_quantile_loss"
MODEL_TABLE = "all_results.csv"
NAIVE_TABLE = Path("seasonal_naive") / "all_results.csv"
NAIVE_NAME = "Seasonal_Naive"


def result_row(key: str, model: str, scores: dict[str, float], domain: str, num_variates: int) -> dict:
    return {"dataset": key, "model": model, **{c: float(scores[k]) for c, k in METRICS}, "domain": domain,
            "num_variates": num_variates}


def read_table(path: Path) -> dict[str, dict]:
    """Rows by dataset key, metrics as floats; {} when the file is not there yet."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["dataset"]: {**r, **{c: float(r[c]) for c, _ in METRICS}} for r in rows}


def write_table(path: Path, rows: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in rows.values():
                writer.writerow([row[c] for c in COLUMNS])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def relative(model: dict[str, dict], naive: dict[str, dict], column: str) -> dict[str, float]:
    """key -> the model's `column` over seasonal naive's, for the keys both tables hold."""
    return {k: model[k][column] / naive[k][column] for k in model if k in naive}


def geometric_mean(values) -> float:
    values = list(values)
    if not values:
        return math.nan
    with_logs = [math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan) for v in values]
    return math.exp(sum(with_logs) / len(with_logs))


def headline(out: Path) -> str:
    """The command's last line, from the two tables in `out`."""
    model, naive = read_table(out / MODEL_TABLE), read_table(out / NAIVE_TABLE)
    mase, crps = relative(model, naive, MASE), relative(model, naive, CRPS)
    return (f"GIFT-Eval over {len(mase)} configs: MASE {geometric_mean(mase.values()):.4f}, "
            f"CRPS {geometric_mean(crps.values()):.4f} (geometric mean relative to seasonal naive)")
