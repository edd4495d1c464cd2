"""The fine-tuned model's record and report: `training_data.json` (what it was trained on, what was held out) and
`finetune_report.md` / `.json` (zero-shot vs fine-tuned on the test split, scored by `timemoe-eval`'s own code)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from data_prep.corpus_manifest import MANIFEST_NAME
from data_prep.sources.tabular import TIMESTAMP_NAMES

from ..checkpoint import BEST
from ..checkpoint.digests import file_digest
from ..evaluate import evaluate_many
from ..evaluate.leakage import leakage_lines
from ..evaluate.report import label
from ..model.hf_layout import TRAINING_DATA
from .split import FinetuneError, Input, rows_per_hour

MODELS = ("zero-shot", "fine-tuned")
METRICS = ("mse", "mae", "mase")


def write_training_data(out: Path, model_dir: Path, split: dict, corpus: Path) -> None:
    """The fine-tuning corpus, the split (what was trained on and held out) and the base model's own record."""
    base = model_dir / TRAINING_DATA
    record = {"corpus": str(corpus), "manifest_sha256": file_digest(corpus / MANIFEST_NAME)[1], "leakage_guard": None,
              "fine_tuned_from": {"model": str(model_dir),
                                  "training_data": json.loads(base.read_text()) if base.is_file() else None},
              "split": split}
    (out / TRAINING_DATA).write_text(json.dumps(record, indent=1) + "\n")


def eval_options(data: Input, split, horizons, context: int, max_windows: int | None) -> dict:
    """`evaluate_many`'s options for the fine-tuning file: the same test split, the report's protocol."""
    if data.kind != "csv":
        raise FinetuneError(f"{data.path}: the before/after report scores wide CSV files (timemoe-eval's input); "
                            "the model is exported, evaluate it with timemoe-eval on a CSV of the test period")
    header = list(pd.read_csv(data.path, nrows=0).columns)
    date = next((c for c in TIMESTAMP_NAMES if c in header), None)
    options = {"horizons": list(horizons), "context_lengths": [context], "max_windows": max_windows,
               "date_column": date}
    if split == "ett":
        options["ett_rows_per_hour"] = rows_per_hour(data.freq, data.path)
    else:
        options["split_ratios"] = list(split)
    return options


def eval_command(out: Path, data: Input, options: dict) -> str:
    """The timemoe-eval command that scores OUT_DIR on the same windows (ETT splits come from an ETT file's name)."""
    parts = [f"timemoe-eval {out} --csv {data.path}", f"--horizons {','.join(map(str, options['horizons']))}",
             f"--context-lengths {options['context_lengths'][0]}", f"--date-column {options['date_column']}"]
    if options["max_windows"]:
        parts.append(f"--max-windows {options['max_windows']}")
    if "split_ratios" in options:
        parts.append(f"--split-ratios {','.join(map(str, options['split_ratios']))}")
    return " ".join(parts)


def training_summary(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    validations = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best = run_dir / "checkpoints" / BEST
    return {"steps": records[-1]["step"] if records else None, "best_checkpoint": best.read_text().strip()
            if best.is_file() else None, "validations": validations}


def write_report(model_dir: Path, out: Path, data: Input, options: dict, started: float) -> dict:
    from .cli import RUN

    results = evaluate_many(dict(zip(MODELS, (model_dir, out))), [data.path], out_dir=out / RUN / "eval",
                            **options)
    d = results["datasets"][0]
    rows = [{"horizon": r["horizon"], "context_length": r["context_length"],
             "windows_per_channel": r["windows_evaluated_per_channel"], "metrics": r["metrics"],
             "fine_tuned_beats_zero_shot": {m: r["metrics"]["fine-tuned"][m] < r["metrics"]["zero-shot"][m]
                                            for m in METRICS}} for r in d["rows"]]
    report = {"model_dir": str(model_dir), "out": str(out), "data": str(data.path), "split": d["borders"],
              "columns": d["columns"], "season_length": d["season_length"], "rows": rows,
              "leakage": d["leakage"], "training": training_summary(out / RUN),
              "eval_command": eval_command(out, data, options),
              "wall_time_s": round(time.perf_counter() - started, 1)}
    files = {"json": out / "finetune_report.json", "markdown": out / "finetune_report.md"}
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    files["markdown"].write_text(markdown(report, d))
    return report


def markdown(report: dict, results: dict) -> str:
    b, t = report["split"], report["training"]
    lines = [f"# Fine-tuning report: {Path(report['data']).name}", "",
             f"Zero-shot `{report['model_dir']}` vs fine-tuned `{report['out']}` on the test split (rows "
             f"[{b['test'][0]}, {b['test'][1]}); trained on rows [{b['train'][0]}, {b['train'][1]}), validated on "
             f"[{b['val'][0]}, {b['val'][1]})), every channel forecast univariately, MSE/MAE on values scaled by "
             "the train split's per-channel mean/std, next to the baselines on the same windows. Scored by "
             f"timemoe-eval's code; `{report['eval_command']}` reproduces the fine-tuned rows.", "",
             "| horizon | context | windows / channel | forecaster | MSE | MAE | MASE |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for name in results["forecasters"]:
            m = r["metrics"][name]
            lines.append(f"| {r['horizon']} | {r['context_length']} | {r['windows_per_channel']} | "
                         f"{label(name, results)} | {m['mse']:.4f} | {m['mae']:.4f} | {m['mase']:.4f} |")
    wins = [f"{r['horizon']}: " + ", ".join(f"{m.upper()} {'better' if won else 'NOT better'}"
                                            for m, won in r["fine_tuned_beats_zero_shot"].items())
            for r in report["rows"]]
    lines += ["", "Fine-tuned vs zero-shot at each horizon: " + "; ".join(wins) + ".", "",
              f"Training: {t['steps']} steps; exported checkpoint {t['best_checkpoint']} (lowest validation loss); "
              "validation loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in t["validations"]) + ".", "",
              f"Wall time (split, training, export, report): {report['wall_time_s'] / 60:.1f} min.", "",
              "## Leakage", "", *(f"- {line}" for line in leakage_lines({"datasets": [results]}))]
    return "\n".join(lines) + "\n"
