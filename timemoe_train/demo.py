"""`make demo`: the whole product on a laptop CPU, in four stages.

1. prep:   a real multi-domain corpus from series that pip packages ship, plus the seeded synthetic domain, with
           ETTh1 kept out by the leakage guard → Arrow shards + manifest
2. train:  a small Time-MoE with its experts split over 2 CPU processes (EP=2, gloo) in a DeepSpeed engine
3. export: the checkpoint → the released HF layout (loads with AutoModelForCausalLM, trust_remote_code=True)
4. eval:   zero-shot on ETTh1 (long-horizon protocol, horizon 96) against seasonal-naive and last-value baselines,
           MSE and MAE, on 500 evenly spread test windows per channel (a sample, for time: the summary says how
           large each margin is, and prints the command that scores all 2,785 windows)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ETTH1 = REPO / "examples" / "data" / "ETTh1.csv"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def prep(out: Path, workers: int) -> dict:
    from data_prep import PrepOptions, prepare
    from data_prep.inspect import summary_table
    from data_prep.sources import EmbeddedSource

    # overwrite: the corpus is rebuilt on every run (prep takes seconds), so one left by an earlier version of the
    # demo is replaced instead of refused
    manifest = prepare(EmbeddedSource(), out, PrepOptions(workers=workers, overwrite=True))
    print(summary_table(out))
    return manifest


def train(data: Path, run_dir: Path, steps: int | None, nproc: int) -> Path:
    ckpt = run_dir / "checkpoints"
    if run_dir.exists():  # the demo trains from scratch each time; an earlier run would otherwise be resumed
        print(f"removing the earlier demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "timemoe_train.launch", f"--nproc-per-node={nproc}", "--", "experiment=demo",
           f"data.path={data}", f"checkpoint.dir={ckpt}", f"hydra.run.dir={run_dir}",
           f"parallel.expert_parallel_size={nproc}"]
    if steps is not None:
        cmd.append(f"trainer.max_steps={steps}")
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return ckpt


def export(ckpt: Path, out: Path) -> None:
    from .export.cli import main as export_main

    export_main([str(ckpt), str(out)])  # exits with a message on a bad checkpoint


def evaluate(model_dir: Path, out: Path, max_windows: int) -> dict:
    from .evaluate import evaluate_long_horizon

    results = evaluate_long_horizon({"demo model": model_dir}, ETTH1, horizons=(96,), context_lengths=(512,),
                                    max_windows=max_windows, out_dir=out)
    print(Path(results["files"]["markdown"]).read_text())
    return results


def comparisons(results: dict) -> dict:
    """The demo model against each baseline in each metric at horizon 96, as numbers, the relative margin (> 0:
    the model is better) and a word, whatever they are."""
    row = next(r for r in results["rows"] if r["horizon"] == 96)
    ours = row["metrics"]["demo model"]
    out = {"windows_per_channel": row["windows_evaluated_per_channel"], "windows_in_test": row["windows_per_channel"],
           "demo model": ours}
    for baseline in ("seasonal_naive", "last_value"):
        out[baseline] = {m: {"value": row["metrics"][baseline][m], "beaten": ours[m] < row["metrics"][baseline][m],
                             "margin": 1 - ours[m] / row["metrics"][baseline][m]} for m in ("mse", "mae")}
    return out


def verdict(results: dict, model_dir: Path) -> list[str]:
    c = comparisons(results)
    lines = [f"ETTh1, horizon 96, context 512, {c['windows_per_channel']:,} of {c['windows_in_test']:,} test windows "
             "per channel (7 channels):"]
    for m in ("mse", "mae"):
        parts = [f"{name.replace('_', ' ')} {c[name][m]['value']:.3f} "
                 + (f"(beats it by {c[name][m]['margin']:.1%})" if c[name][m]["beaten"] else
                    f"(does NOT beat it: {-c[name][m]['margin']:.1%} behind)")
                 for name in ("seasonal_naive", "last_value")]
        lines.append(f"  {m.upper()}: demo model {c['demo model'][m]:.3f} vs " + "; vs ".join(parts))
    if c["windows_per_channel"] < c["windows_in_test"]:
        lines.append("  a sample of the test windows, for time; every window (the margins differ, README): " +
                     shlex.join(["timemoe-eval", str(model_dir), "--csv", str(ETTH1), "--horizons", "96",
                                 "--context-lengths", "512"]))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m timemoe_train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo",
                   help="output folder; each run starts over in it (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: experiment=demo's)")
    p.add_argument("--nproc", type=int, default=2, help="CPU processes; experts are split over them (EP=nproc)")
    p.add_argument("--max-windows", type=int, default=500, help="ETTh1 test windows per channel, evenly spread")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()

    banner("1/4 prep: embedded multi-domain corpus → Arrow shards")
    prep(out / "data", workers=2)
    banner(f"2/4 train: small Time-MoE, EP={args.nproc} over {args.nproc} CPU processes (gloo, DeepSpeed)")
    ckpt = train(out / "data", out / "train", args.steps, args.nproc)
    banner("3/4 export: checkpoint → HF layout")
    export(ckpt, out / "hf")
    banner("4/4 eval: zero-shot ETTh1 vs baselines")
    results = evaluate(out / "hf", out / "eval", args.max_windows)

    summary = {"verdict": verdict(results, out / "hf"), "comparisons": comparisons(results),
               "elapsed_min": round((time.perf_counter() - started) / 60, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    banner("done")
    print("\n".join(summary["verdict"]))
    wandb_runs = sorted((out / "train").glob("wandb/offline-run-*"))
    for label, path in [("corpus + manifest", out / "data" / "manifest.json"),
                        ("training metrics", out / "train" / "metrics.jsonl"),
                        ("offline W&B run", wandb_runs[-1] if wandb_runs else "(none)"),
                        ("checkpoints", ckpt), ("HF export", out / "hf"),
                        ("eval table / plot", out / "eval")]:
        print(f"  {label:<18} {path}")
    print(f"  (sync the W&B run with `wandb sync <dir>`; total {summary['elapsed_min']} min)")


if __name__ == "__main__":
    main()
