"""The fine-tuned model's record and report: `training_data.json` (what it was trained on, what was held out) and
`finetune_report.md` / `.json` (zero-shot vs fine-tuned on the test split, scored by `timemoe-eval`'s own code)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np

from data_prep.corpus_manifest import MANIFEST_NAME
from data_prep.sources.tabular import SUFFIXES

from ..checkpoint import BEST
from ..checkpoint.digests import file_digest
from ..evaluate import EvalError, evaluate_many
from ..evaluate.data import ETT_ROWS_PER_HOUR, Series, season_length as eval_season_length
from ..evaluate.long_horizon import plan_windows, read_datasets
from ..evaluate.leakage import leakage_lines
from ..evaluate.report import gap_note, label
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


def eval_inputs(data: Input, split, horizons, context: int, max_windows: int | None,
                season_length: int | None) -> tuple[list[Series], dict]:
    """`evaluate_many`'s datasets and options for the fine-tuning data (the same test split, the report's protocol),
    each dataset checked under them: bad data for the report stops timemoe-finetune before training starts. A table
    is read as timemoe-eval reads it (the report's eval_command scores it again); other data as its series, those
    of one length together (each length is one dataset of the report)."""
    options = {"horizons": list(horizons), "context_lengths": [context], "max_windows": max_windows,
               "season_length": season_length}
    if split == "ett":
        options["ett_rows_per_hour"] = rows_per_hour(data.freq, data.path)
    else:
        options["split_ratios"] = list(split)
    try:
        if data.kind in SUFFIXES:
            datasets = read_datasets(data.path)
        else:
            path = data.path / MANIFEST_NAME if data.kind == "corpus" else data.path  # what the record hashes
            lengths = sorted({len(v) for _, v in data.series})
            datasets = [Series(path, [name for name, v in data.series if len(v) == n],
                               np.stack([v for _, v in data.series if len(v) == n], axis=1),
                               eval_season_length(data.freq), data.freq,
                               data.path.stem if len(lengths) == 1 else f"{data.path.stem} ({n} points)")
                        for n in lengths]
        for dataset in datasets:
            plan_windows(dataset, **options)
    except EvalError as e:
        raise FinetuneError(f"the before/after report cannot score this data: {e}") from None
    return datasets, options


def eval_command(out: Path, data: Input, options: dict) -> str | None:
    """The timemoe-eval command that scores OUT_DIR on the same windows (ETT splits come from an ETT file's name);
    None for data timemoe-eval does not read (a .jsonl file, a prepared corpus) or splits otherwise."""
    ett_named = data.path.stem.lower() in ETT_ROWS_PER_HOUR
    if data.kind not in SUFFIXES or ("ett_rows_per_hour" in options) != ett_named:
        return None
    command = ["timemoe-eval", str(out), "--csv", str(data.path), "--horizons", ",".join(map(str, options["horizons"])),
               "--context-lengths", str(options["context_lengths"][0])]
    for option, key in (("--max-windows", "max_windows"), ("--season-length", "season_length")):
        if options[key]:
            command += [option, str(options[key])]
    if "split_ratios" in options:
        command += ["--split-ratios", ",".join(map(str, options["split_ratios"]))]
    return shlex.join(command)


def training_summary(run_dir: Path) -> dict:
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    validations = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best = run_dir / "checkpoints" / BEST
    return {"steps": records[-1]["step"] if records else None, "best_checkpoint": best.read_text().strip()
            if best.is_file() else None, "validations": validations}


def write_report(model_dir: Path, out: Path, data: Input, inputs: list, options: dict, started: float) -> dict:
    from .cli import RUN

    results = evaluate_many(dict(zip(MODELS, (model_dir, out))), inputs, out_dir=out / RUN / "eval", **options)
    datasets = [{"dataset": d["dataset"], "split": d["borders"], "columns": d["columns"],
                 "season_length": d["season_length"], "leakage": d["leakage"],
                 "rows": [{"horizon": r["horizon"], "context_length": r["context_length"],
                           "windows_per_channel": r["windows_evaluated_per_channel"], "metrics": r["metrics"],
                           "gaps": r["gaps"],
                           "fine_tuned_beats_zero_shot": {m: r["metrics"]["fine-tuned"][m] <
                                                          r["metrics"]["zero-shot"][m] for m in METRICS}}
                          for r in d["rows"]]} for d in results["datasets"]]
    report = {"model_dir": str(model_dir), "out": str(out), "data": str(data.path), "datasets": datasets,
              "training": training_summary(out / RUN), "eval_command": eval_command(out, data, options),
              "wall_time_s": round(time.perf_counter() - started, 1)}
    files = {"json": out / "finetune_report.json", "markdown": out / "finetune_report.md"}
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    files["markdown"].write_text(markdown(report, results))
    return report


def markdown(report: dict, results: dict) -> str:
    t = report["training"]
    reproduce = (f"timemoe-eval's code (`{report['eval_command']}` reproduces the fine-tuned rows)"
                 if report["eval_command"] else "timemoe-eval's code, on the series as read")
    lines = [f"# Fine-tuning report: {Path(report['data']).name}", "",
             f"Zero-shot `{report['model_dir']}` vs fine-tuned `{report['out']}` on each series' test split, every "
             "channel forecast univariately; MSE/MAE on values scaled by the train split's per-channel mean/std, "
             f"MASE against the seasonal difference of each context; baselines on the same windows. Scored by "
             f"{reproduce}.", ""]
    for d, r in zip(report["datasets"], results["datasets"]):
        b = d["split"]
        lines += [f"## {d['dataset']}", "", f"Rows [{b['train'][0]}, {b['train'][1]}) trained on, "
                  f"[{b['val'][0]}, {b['val'][1]}) validated on, [{b['test'][0]}, {b['test'][1]}) tested on "
                  f"({len(d['columns'])} series).", "",
                  "| horizon | context | windows / series | forecaster | MSE | MAE | MASE |",
                  "|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            for name in r["forecasters"]:
                m = row["metrics"][name]
                lines.append(f"| {row['horizon']} | {row['context_length']} | {row['windows_per_channel']} | "
                             f"{label(name, r)} | {m['mse']:.4f} | {m['mae']:.4f} | {m['mase']:.4f} |")
        wins = [f"{row['horizon']}: " + ", ".join(f"{m.upper()} {'better' if won else 'NOT better'}"
                                                  for m, won in row["fine_tuned_beats_zero_shot"].items())
                for row in d["rows"]]
        lines += ["", "Fine-tuned vs zero-shot by horizon: " + "; ".join(wins) + ".", ""]
        gaps = gap_note([d])
        lines += [gaps, ""] if gaps else []
    lines += [f"Training: {t['steps']} steps; exported checkpoint {t['best_checkpoint']} (lowest validation loss); "
              "validation loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in t["validations"]) + ".", "",
              f"Wall time (split, training, export, report): {report['wall_time_s'] / 60:.1f} min.", "",
              "## Leakage", "", *(f"- {line}" for line in leakage_lines(results))]
    return "\n".join(lines) + "\n"
