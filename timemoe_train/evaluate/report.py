"""results.json, results.md (one table, model and baselines side by side) and forecasts.png (one window per
horizon) from the dict `evaluate_long_horizon` returns."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display needed

LABELS = {"model": "Time-MoE", "seasonal_naive": "Seasonal naive", "last_value": "Last value"}


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "forecasts.png"}
    # The plot's raw samples stay out of the JSON: it is the scores' record.
    paths["json"].write_text(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(results))
    plot_samples(results, paths["png"])
    return paths


def markdown_table(results: dict) -> str:
    names = list(results["average"])
    labels = [f"{LABELS[n]} ({results['season_length']})" if n == "seasonal_naive" else LABELS[n] for n in names]
    header = "| horizon | context | windows / channel | " + " | ".join(f"{lab} MSE | {lab} MAE" for lab in labels)
    lines = [
        f"# {results['dataset']}: long-horizon forecasting",
        "",
        f"Model `{results['model']}` ({results['backend']}, {results['dtype']}); {len(results['columns'])} channels "
        f"forecast univariately; MSE/MAE on values scaled by the train split's per-channel mean/std.",
        "",
        header + " |",
        "|" + "---|" * (3 + 2 * len(names)),
    ]

    def cells(metrics):
        return " | ".join(f"{metrics[n]['mse']:.4f} | {metrics[n]['mae']:.4f}" for n in names)

    for r in results["rows"]:
        windows = str(r["windows_per_channel"])
        if r["windows_evaluated_per_channel"] != r["windows_per_channel"]:
            windows = f"{r['windows_evaluated_per_channel']} of {windows}"
        lines.append(f"| {r['horizon']} | {r['context_length']} | {windows} | {cells(r['metrics'])} |")
    lines.append(f"| **average** | | | {cells(results['average'])} |")
    if results["max_windows"] is not None:
        lines += ["", f"Quick run: {results['subsampling']} (N = {results['max_windows']})."]
    return "\n".join(lines) + "\n"


def plot_samples(results: dict, path: Path) -> None:
    samples = results["samples"]
    fig = Figure(figsize=(10, 2.6 * len(samples)), layout="constrained")
    for ax, s in zip(fig.subplots(len(samples), 1, squeeze=False)[:, 0], samples):
        tail, h = len(s["context_tail"]), s["horizon"]
        future = range(tail, tail + h)
        ax.plot(range(tail), s["context_tail"], color="0.4", lw=1, label="context")
        ax.plot(future, s["truth"], color="black", lw=1, label="truth")
        for name, style in (("model", "C0"), ("seasonal_naive", "C1:"), ("last_value", "C2--")):
            ax.plot(future, s[name], style, lw=1.2, label=LABELS[name])
        ax.axvline(tail - 0.5, color="0.7", lw=0.8)
        ax.set_title(f"{results['dataset']} / {results['columns'][-1]}: horizon {h}, "
                     f"forecast from row {s['forecast_row']}",
                     fontsize=9)
    fig.axes[0].legend(fontsize=8, ncol=5, loc="upper left")
    fig.savefig(path, dpi=100)
