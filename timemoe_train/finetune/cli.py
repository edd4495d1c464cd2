"""`timemoe-finetune MODEL_DIR --data PATH --out OUT_DIR [--split ett | TRAIN,VAL,TEST] [key=value ...]`: a
pretrained Time-MoE (the released TimeMoE-50M/200M or a timemoe-export output) fine-tuned on the user's series,
the best validation checkpoint exported to OUT_DIR in the released layout, with a before/after report.

Each series is split in time order (split.py); the train parts are the training corpus and the val parts the
validation corpus (both prepared by timemoe-prep's pipeline under OUT_DIR/finetune/data), and the test parts are
written nowhere training reads. Training is `timemoe-train` itself (its launcher, over torchrun): the Hydra config is
experiment=finetune, the model's own architecture from its config.json, and every key=value given here last, so
any key can be overridden (parallel=expert, parallel.zero_stage=2, optim.lr=...). OUT_DIR/finetune is the run
directory: the same command again resumes it (and once the model is exported, writes the report alone);
SIGTERM/SIGINT stop it after a save, as in pretraining. The data is checked for the report, as timemoe-eval reads
it (gaps included: see timemoe-eval), before training starts.

Exit status: 0 done, 2 bad input (one line on stderr, nothing written; or the report's, the fine-tuned model kept),
the trainer's status otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoint import BEST
from ..cli_types import int_list
from ..data.loader import STOP_SIGNALS
from ..model.config import HF_CONFIG_KEYS, ConfigError, TimeMoeConfig
from .report import eval_inputs
from .split import FinetuneError, parse_split, read_input, split_record, split_series, write_part

RUN = "finetune"  # OUT_DIR/finetune: the run directory (corpora, checkpoints, metrics, Hydra's files)
SPLIT_RECORD = "split.json"
# In the run directory once OUT_DIR holds the export: the training command and the checkpoint exported. The same
# command again then writes the report alone.
EXPORTED = "exported.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timemoe-finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="HF-layout Time-MoE (config.json + model.safetensors)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="timemoe-train config overrides")
    p.add_argument("--data", required=True, type=Path,
                   help="wide or long CSV, parquet, arrow, .jsonl of {\"sequence\": [...]} lines, or a timemoe-prep "
                        "output directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (the fine-tuned model and its report)")
    p.add_argument("--split", default="0.7,0.1,0.2",
                   help="ett (12/4/4 months at the file's sampling rate) or TRAIN,VAL,TEST fractions per series "
                        "(default 0.7,0.1,0.2)")
    p.add_argument("--horizons", type=int_list, default=[96, 192, 336, 720],
                   help="report horizons (default 96,192,336,720); training windows cover the longest")
    p.add_argument("--context-length", type=int, default=512,
                   help="forecast context of the report, one for every horizon (default 512); training windows are "
                        "context + the longest horizon points")
    p.add_argument("--max-windows", type=int, default=100,
                   help="report: N evenly spaced test windows per horizon and channel (default 100; 0: all)")
    p.add_argument("--season-length", type=int, default=None,
                   help="seasonal-naive period of the report (default: from the sampling rate, e.g. 24 hourly)")
    p.add_argument("--nproc", type=int, default=2,
                   help="training processes (timemoe-train --nproc-per-node; default 2, data-parallel)")
    return p


def model_overrides(model_dir: Path) -> list[str]:
    """The architecture of MODEL_DIR's config.json as model.* overrides (JSON values are Hydra override values)."""
    try:
        config = TimeMoeConfig.load(model_dir)
    except ConfigError as e:
        raise FinetuneError(f"MODEL_DIR {model_dir}: not a Time-MoE ({e})") from None
    hf = config.to_hf_dict()
    return [f"++model.{k}={json.dumps(hf[k])}" for k in HF_CONFIG_KEYS if k in hf]  # ++: set, present or not


def compose(overrides: list[str]):
    """The run config as timemoe-train will compose it, instantiated (bad keys and values are caught here)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..train.__main__ import CONFIG_DIR, USER_ERRORS, run_config

    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="timemoe-finetune"):
            cfg = hydra_compose("train", overrides=overrides)
        return cfg, run_config(cfg)
    except (HydraException, OmegaConfBaseException, *USER_ERRORS) as e:
        raise FinetuneError(" ".join(str(e).split())) from None


def check_weights(model_dir: Path) -> None:
    from ..evaluate import EvalError, load_model

    try:
        load_model(model_dir)
    except EvalError as e:
        raise FinetuneError(f"MODEL_DIR {model_dir}: not a Time-MoE ({e})") from None


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    """`timemoe-train --nproc-per-node N`: a config error is said once, and stop signals reach every trainer."""
    return [sys.executable, "-m", "timemoe_train.launch", f"--nproc-per-node={nproc}", "--", *overrides]


def train(command: list[str], nproc: int) -> tuple[bool, int]:
    """Run timemoe-train's launcher; a stop signal sent to this process is passed on (the trainers save and exit
    0), so that a scheduler that signals only this command still stops the run cleanly. (stopped, status)"""
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": threads})
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        return bool(stopped), child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    started = time.perf_counter()
    out, run_dir = args.out.resolve(), args.out.resolve() / RUN
    try:
        split = parse_split(args.split)
        if args.nproc < 1 or args.context_length < 1 or not args.horizons or min(args.horizons) < 1:
            raise FinetuneError(f"--nproc {args.nproc}, --context-length {args.context_length}, --horizons "
                                f"{args.horizons}: must be positive")
        model_dir = args.model_dir.resolve()
        base = model_overrides(model_dir)
        check_weights(model_dir)
        data_dir = run_dir / "data"
        overrides = ["experiment=finetune", *base, f"data.path={data_dir / 'train'}",
                     f"trainer.val_path={data_dir / 'val'}", f"trainer.init_from_hf={model_dir}",
                     f"data.max_length={args.context_length + max(args.horizons)}",
                     # window statistics from the context part alone, as forecast() scales a context by itself
                     f"data.normalization_excludes={max(args.horizons)}", f"run.dir={run_dir}",
                     *args.overrides]
        cfg, run = compose(overrides)
        data = read_input(args.data)
        splits = split_series(data, split, run.data.max_length + 1, max(args.horizons))
        record = split_record(data, split, splits)
        inputs, options = eval_inputs(data, split, args.horizons, args.context_length, args.max_windows or None,
                                      args.season_length)
        previous = run_dir / SPLIT_RECORD
        if previous.is_file() and json.loads(previous.read_text()) != record:
            raise FinetuneError(f"--out {out}: holds a fine-tuning run of other data or another split "
                                f"({previous}); choose another --out")
    except FinetuneError as e:
        return _user_error(str(e))

    command = train_command(args.nproc, overrides)
    exported = json.loads((run_dir / EXPORTED).read_text()) if (run_dir / EXPORTED).is_file() else {}
    if exported.get("command") == command:
        print(f"timemoe-finetune: {out} already holds the model this command fine-tuned (checkpoint "
              f"{exported['checkpoint']}); writing its report", flush=True)
    else:
        status = train_and_export(args, data, splits, record, run, command, model_dir, out)
        if status:
            return status
    from ..forecast import ForecastError
    from .report import write_report

    try:
        report = write_report(model_dir, out, data, inputs, options, started)
    except ForecastError as e:  # checked before training: only a changed file or model gets here
        return _user_error(f"the fine-tuned model is in {out}, but its report failed: {e}")
    print(Path(report["files"]["markdown"]).read_text())
    print(f"wrote {out} (fine-tuned model), {report['files']['markdown']}, {report['files']['json']} "
          f"in {report['wall_time_s'] / 60:.1f} min")
    return 0


def train_and_export(args, data, splits, record: dict, run, command: list[str], model_dir: Path, out: Path) -> int:
    """The corpora, the training run and its best checkpoint exported to `out`; the status to exit with when
    training did not finish (0 when it did)."""
    run_dir, data_dir = out / RUN, out / RUN / "data"
    created = not out.exists()
    (run_dir / EXPORTED).unlink(missing_ok=True)  # out's model is about to be replaced
    try:
        write_part(data, splits, "train", data_dir / "train")
        write_part(data, splits, "val", data_dir / "val")
        run.validate(args.nproc)
    except Exception as e:
        if created:  # nothing of a run that never started is left behind
            shutil.rmtree(out, ignore_errors=True)
        from ..train.config import TrainConfigError

        if isinstance(e, TrainConfigError):
            return _user_error(str(e))
        raise
    (run_dir / SPLIT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    print(f"timemoe-finetune: {len(splits)} series of {data.path} split {args.split}: training on the train "
          f"parts, validating on the val parts; the test parts are held out", flush=True)

    print("$", shlex.join(command), flush=True)
    stopped, status = train(command, args.nproc)
    if stopped or status != 0:
        why = "stopped by a signal, after saving" if stopped else f"exited with status {status}"
        print(f"timemoe-finetune: training {why}; the same command resumes it", file=sys.stderr)
        return status

    from ..export.cli import export
    from .report import write_training_data

    export(run.checkpoint.dir, out, tag="best")
    write_training_data(out, model_dir, record, data_dir / "train")
    best = (Path(run.checkpoint.dir) / BEST).read_text().strip()
    (run_dir / EXPORTED).write_text(json.dumps({"command": command, "checkpoint": best}, indent=1) + "\n")
    return 0


def _user_error(message: str) -> int:
    print(f"timemoe-finetune: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
