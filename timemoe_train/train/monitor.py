"""Where step records go (rank 0 only): `metrics.jsonl` in the run directory, Weights & Biases, a progress bar, and
heatmap images. Nothing secret is written: configs pass through `scrub`.

W&B settings: a `logger.wandb.*` key set in the config wins; a key left null leaves it to W&B's own environment
(WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, ...), and where that says nothing either: offline, project
`timemoe-train`, files in the run directory.

One history per run, in both places. A launch that continues a run from its checkpoint at step k marks its first
record in `metrics.jsonl` (`restarted_from_step: k`: later records replace those of steps after k), and rewinds the
checkpoint's W&B run to step k (`resume_from="<run id>?_step=<k>"`): W&B truncates the run's history after k, so
the steps an earlier launch logged past its last checkpoint (killed, or resumed from an older checkpoint because the
newer ones failed verification) leave the charts, and the re-played steps are kept. Offline (the default), the
rewind is recorded in the new launch's `wandb/offline-run-*` folder (a branch point) and applied when the run's
folders are synced in the order they were written (`wandb sync <run dir>/wandb/offline-run-*`; wandb >= 0.20
records it). A server that refuses the rewind (it needs W&B's run-rewind feature) gets a new run instead, said in
one line: its history starts at step k+1 and the checkpoints from then on name it. What W&B loses on its own side
stays lost there: its service writes the offline file every 15 s (WANDB__TRANSACTION_LOG_FLUSH_INTERVAL) and uploads
online runs every few seconds, so a kill -9 that takes the service down too drops its last seconds of steps from W&B
(never mixing them); metrics.jsonl, written and flushed per record, has them."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from .report import ProgressLines, say

_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)


def scrub(obj):
    """A copy of a config container with the values of secret-looking keys replaced by '***'."""
    if isinstance(obj, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) else scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


# Where neither the config nor W&B's environment variable says anything.
_WANDB_FALLBACKS = {"mode": ("WANDB_MODE", "offline"), "project": ("WANDB_PROJECT", "timemoe-train")}


def wandb_settings(cfg, run_dir: Path, env=os.environ) -> dict:
    """Keyword arguments for `wandb.init`: the config's explicit values; None (W&B reads its environment) for the
    rest, or our fallback when that environment is silent too."""
    settings = {k: getattr(cfg, k) for k in ("mode", "project", "entity", "name", "group")}
    for key, (variable, fallback) in _WANDB_FALLBACKS.items():
        if settings[key] is None and not env.get(variable):
            settings[key] = fallback
    settings["dir"] = None if env.get("WANDB_DIR") else str(run_dir)
    return settings


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; the `skipped` field says what happened
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _wandb_value(value):
    """A list (one layer's expert loads) becomes a W&B histogram with one bin per expert, its height the
    expert's share: W&B draws it as bars and shows how it moves over the steps."""
    if not isinstance(value, list):
        return value
    import numpy as np
    import wandb

    return wandb.Histogram(np_histogram=(np.asarray(value, dtype=float), np.arange(len(value) + 1)))


def rewind_point(wandb_id: str | None, start_step: int) -> str | None:
    """W&B's name for the moment a continued run goes on from: its step `start_step` (the checkpoint's)."""
    return f"{wandb_id}?_step={start_step}" if wandb_id else None


class Monitor:
    def __init__(self, run_dir: Path, cfg, enabled: bool, config: dict, total_steps: int, start_step: int,
                 wandb_id: str | None = None):
        """`wandb_id`: the W&B run of the checkpoint this launch resumes from (at `start_step`), if any."""
        self.cfg, self.enabled, self.run_dir = cfg, enabled, Path(run_dir)
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        # A launch that continues a run marks its first record: records of steps after its checkpoint that an
        # earlier launch wrote (before a crash or kill) are repeated after the mark, and the later copy counts.
        self.restarted_from = start_step if path.exists() and path.stat().st_size else None
        self.metrics = open(path, "a")
        # A bar on a terminal, and plain lines in the run's log; without a terminal the lines go to stdout too (a
        # bar in a file is one line of carriage returns).
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and self.terminal))
        self.lines = ProgressLines(total_steps, start_step, cfg.progress_interval) if cfg.progress else None
        settings = wandb_settings(cfg.wandb, self.run_dir)
        if settings["mode"] != "disabled":
            self.wandb = self._start_wandb(settings, scrub(config), rewind_point(wandb_id, start_step))
            self.wandb_id = self.wandb.id

    def _start_wandb(self, settings: dict, config: dict, rewind: str | None):
        import wandb

        tags = list(self.cfg.wandb.tags) or None
        if rewind is not None:
            try:
                return wandb.init(**settings, tags=tags, config=config, resume_from=rewind)
            except wandb.Error as e:  # e.g. online, where the server does not offer rewinding
                self.message(f"W&B could not rewind run {rewind} ({e}); logging to a new run from here")
        return wandb.init(**settings, tags=tags, config=config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_safe(v) for k, v in record.items()}
        if self.restarted_from is not None:
            record["restarted_from_step"], self.restarted_from = self.restarted_from, None
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:  # the step's row is complete (committed now, not when the next step comes):
            # a launch killed right after saving this step's checkpoint still has it in W&B
            self.wandb.log({k: _wandb_value(v) for k, v in record.items() if v is not None}, step=record["step"],
                           commit=True)
        self.bar.update(record["step"] - self.bar.n)
        parts = [f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss nan",
                 f"aux {record['aux_loss']:.3f}" if record.get("aux_loss") is not None else None,
                 f"lr {record['lr']:.2e}",
                 f"gnorm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else None,
                 f"{record['tokens_per_s']:.0f} pts/s",
                 f"mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else None]
        self.bar.set_postfix_str(" | ".join(p for p in parts if p), refresh=False)
        line = self.lines and self.lines.line(record)
        if line:
            say(line, terminal=not self.terminal)

    def log_figure(self, step: int, name: str, fig) -> None:
        """Save a matplotlib figure as `<run dir>/<name>/step<step>.png` and send it to W&B under `name`."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        folder = self.run_dir / name
        folder.mkdir(exist_ok=True)
        path = folder / f"step{step:08d}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step, commit=False)  # the step's record completes it

    def message(self, text: str) -> None:
        if self.enabled:
            say(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
