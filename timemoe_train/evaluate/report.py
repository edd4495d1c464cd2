"""results.json, results.md (one table: every dataset, horizon and forecaster, then each model's leakage status on
each dataset) and forecasts_<dataset>.png (one window per horizon, every model and baseline) from the dict
`evaluate_many` returns."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display needed

from .leakage import leakage_lines

LABELS = {"model": "Time-MoE", "seasonal_naive": "Seasonal naive", "last_value": "Last value"}
HEADER = ["| dataset | horizon | context | windows / channel | forecaster | MSE | MAE | MASE |",
          "|---|---|---|---|---|---|---|---|"]


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    # The plots' raw samples stay out of the JSON: it is the scores' record.
    record = {**results, "datasets": [{k: v for k, v in d.items() if k not in ("samples", "files")}
                                      for d in results["datasets"]]}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    for d in results["datasets"]:
        paths[f"png:{d['dataset']}"] = out / f"forecasts_{d['dataset']}.png"
        plot_samples(d, paths[f"png:{d['dataset']}"])
    return paths


def label(name: str, results: dict) -> str:
    if name == "seasonal_naive":
        return f"{LABELS[name]} ({results['season_length']})"
    return LABELS.get(name, name)


def dataset_rows(results: dict) -> list[str]:
    """The table rows of one dataset: per horizon, one row per forecaster; then the averages over horizons."""
    lines = []

    def row(horizon, context, windows, metrics):
        for name in results["forecasters"]:
            m = metrics[name]
            lines.append(f"| {results['dataset']} | {horizon} | {context} | {windows} | {label(name, results)} | "
                         f"{m['mse']:.4f} | {m['mae']:.4f} | {m['mase']:.4f} |")

    for r in results["rows"]:
        windows = str(r["windows_per_channel"])
        if r["windows_evaluated_per_channel"] != r["windows_per_channel"]:
            windows = f"{r['windows_evaluated_per_channel']} of {windows}"
        row(r["horizon"], r["context_length"], windows, r["metrics"])
    if len(results["rows"]) > 1:
        row("**average**", "", "", results["average"])
    return lines


def gap_note(datasets: list[dict]) -> str | None:
    """What missing points changed, for the rows where any did (see long_horizon.py)."""
    gaps = [f"{d['dataset']}, horizon {r['horizon']}: {g['windows_left_out']} windows left out (no real point in "
            f"their context or truth), {g['truth_points_missing']} missing truth points left out, "
            f"{g['context_points_filled']} context points filled"
            for d in datasets for r in d["rows"] if any((g := r["gaps"]).values())]
    return ("Gaps: " + "; ".join(gaps) + " (contexts filled from the points up to their end, interior gaps "
            "linearly; missing truth points left out of every metric).") if gaps else None


def markdown_table(results: dict) -> str:
    datasets = results["datasets"]
    models = ", ".join(f"`{label(k, datasets[0])}` ({v})" for k, v in results["models"].items())
    lines = [
        f"# Long-horizon forecasting: {', '.join(d['dataset'] for d in datasets)}",
        "",
        f"Models: {models} ({datasets[0]['backend']}, {datasets[0]['dtype']}). Every channel is forecast "
        "univariately; MSE/MAE on values scaled by the train split's per-channel mean/std; MASE: each window's MAE "
        "over the mean absolute seasonal difference of its context, averaged over windows.",
        "",
        *HEADER,
    ]
    for d in datasets:
        lines += dataset_rows(d)
    quick = [d for d in datasets if d["max_windows"] is not None]
    if quick:
        lines += ["", f"Quick run: {quick[0]['subsampling']} (N = {quick[0]['max_windows']})."]
    gaps = gap_note(datasets)
    if gaps:
        lines += ["", gaps]
    lines += ["", "## Leakage", "", "Was each benchmark kept out of each model's training corpus (from the model's "
              "training_data.json)?", "", *(f"- {line}" for line in leakage_lines(results))]
    return "\n".join(lines) + "\n"


def plot_samples(results: dict, path: Path) -> None:
    samples = results["samples"]
    fig = Figure(figsize=(10, 2.6 * len(samples)), layout="constrained")
    styles = {"seasonal_naive": "C1:", "last_value": "C2--"}
    models = [n for n in results["forecasters"] if n not in styles]
    styles.update({name: f"C{(3 + i) if i else 0}" for i, name in enumerate(models)})
    for ax, s in zip(fig.subplots(len(samples), 1, squeeze=False)[:, 0], samples):
        tail, h = len(s["context_tail"]), s["horizon"]
        future = range(tail, tail + h)
        ax.plot(range(tail), s["context_tail"], color="0.4", lw=1, label="context")
        ax.plot(future, s["truth"], color="black", lw=1, label="truth")
        for name in results["forecasters"]:
            ax.plot(future, s["forecasts"][name], styles[name], lw=1.2, label=label(name, results))
        ax.axvline(tail - 0.5, color="0.7", lw=0.8)
        ax.set_title(f"{results['dataset']} / {results['columns'][-1]}: horizon {h}, "
                     f"forecast from row {s['forecast_row']}", fontsize=9)
    fig.axes[0].legend(fontsize=8, ncol=5, loc="upper left")
    fig.savefig(path, dpi=100)
