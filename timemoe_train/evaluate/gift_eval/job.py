"""The run: every configuration and term not yet in OUT -> its windows -> the model's and seasonal naive's forecasts
-> gluonts' metrics -> a row in each table, with a progress line per configuration (stderr and OUT/gift_eval.log).

With several processes (torchrun: RANK / WORLD_SIZE set) each forecasts a share of every configuration's windows:
the batches the forecasting core would cut from all of them (`length_batches`), dealt round-robin, so every window
is forecast in the very batch one process would put it in, and the gathered forecasts are the one-process ones.
Rank 0 scores and writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from data_prep.gift_eval import TERMS, Configuration, find_configurations
from ...forecast import forecast_contexts
from ...forecast.batched import length_batches
from ..data import EvalError
from .naive import seasonal_naive
from .results import (MODEL_TABLE, NAIVE_NAME, NAIVE_TABLE, CRPS, MASE, headline, read_table, result_row,
                      write_table)
from .scores import score, seasonality
from .windows import windows_of

LOG = "gift_eval.log"
RUN_RECORD = "run.json"  # what the rows in OUT were computed with: a re-run must match it to add rows
# What the model's rows depend on; a re-run into the same OUT with other values would mix two evaluations.
RESULT_SETTINGS = ("model_dir", "context_length", "dtype")


@dataclass
class GiftEvalJob:
    model_dir: str
    data: str
    out: str
    context_length: int
    batch_size: int = 64
    configs: tuple[str, ...] | None = None  # names under `data` (None: every configuration found)
    terms: tuple[str, ...] = TERMS
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return Path(self.model_dir).resolve().name


def plan(job: GiftEvalJob) -> list[tuple[Configuration, str]]:
    """The (configuration, term) pairs this job scores, in order; terms a configuration's series are too short for
    become notes. Bad selections raise EvalError."""
    if job.context_length < 1 or job.batch_size < 1:
        raise EvalError(f"--context-length {job.context_length}, --batch-size {job.batch_size}: must be positive")
    bad_terms = [t for t in job.terms if t not in TERMS]
    if bad_terms or not job.terms:
        raise EvalError(f"--terms {','.join(bad_terms) or repr('')}: choose from {','.join(TERMS)}")
    found = {c.name: c for c in find_configurations(job.data)}
    if job.configs:
        unknown = [n for n in job.configs if n not in found]
        if unknown:
            raise EvalError(f"--configs {','.join(unknown)}: not under {job.data}, which holds "
                            f"{', '.join(found)}")
    pairs = []
    for config in (found[n] for n in (job.configs or found)):
        for term in config.terms:
            if term not in job.terms:
                continue
            if config.fits(term):
                pairs.append((config, term))
            else:
                job.notes.append(f"{config.dataset_key(term)} not scored: its shortest series "
                                 f"({int(config.lengths.min())} points) has no history before "
                                 f"{config.windows(term)} window(s) of {config.prediction_length(term)}")
    return pairs


def check_out(job: GiftEvalJob) -> None:
    """OUT is new, or holds rows computed with these same settings."""
    record = Path(job.out) / RUN_RECORD
    if not record.is_file():
        return
    try:
        before = json.loads(record.read_text())
    except ValueError as e:
        raise EvalError(f"{record}: unreadable ({e}); use another --out") from None
    now = settings(job)
    changed = [k for k in RESULT_SETTINGS if before.get(k) != now[k]]
    if changed:
        raise EvalError(f"{record}: OUT holds results of {', '.join(f'{k}={before.get(k)!r}' for k in changed)}, "
                        f"not {', '.join(f'{k}={now[k]!r}' for k in changed)}; use another --out")


def settings(job: GiftEvalJob) -> dict:
    record = asdict(job)
    record["model_dir"] = str(Path(job.model_dir).resolve())
    record["data"] = str(Path(job.data).resolve())
    return {k: v for k, v in record.items() if k not in ("notes", "progress", "out")}


class Progress:
    """One line per configuration, on stderr and in OUT/gift_eval.log."""

    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled = out / LOG, enabled

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with open(self.path, "a") as f:
            f.write(stamped + "\n")
        if self.enabled:
            print(f"gift-eval: {line}", file=sys.stderr, flush=True)


def distributed() -> tuple[int, int]:
    """(rank, world size), a gloo group started when torchrun made several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        # Rank 0 scores a configuration while the others wait in the next gather: the default 30 minutes is short
        # for the largest ones.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
    return int(os.environ.get("RANK", "0")), world


def process_device(job: GiftEvalJob) -> str:
    """--device, one GPU per process when several share a node."""
    if job.device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return job.device


def run(job: GiftEvalJob, model, pairs: list[tuple[Configuration, str]]) -> str:
    """Scores every pair of `plan(job)` that OUT does not hold yet; returns the headline."""
    rank, world = distributed()
    out = Path(job.out)
    model_rows, naive_rows = read_table(out / MODEL_TABLE), read_table(out / NAIVE_TABLE)
    todo = [(c, t) for c, t in pairs if not (c.dataset_key(t) in model_rows and c.dataset_key(t) in naive_rows)]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_RECORD).write_text(json.dumps(settings(job), indent=2) + "\n")
    progress = Progress(out, job.progress) if rank == 0 else None
    if progress and len(todo) < len(pairs):
        progress(f"{len(pairs) - len(todo)} of {len(pairs)} configurations already in {out}: skipped")
    for n, (config, term) in enumerate(todo, 1):
        started = time.perf_counter()
        key = config.dataset_key(term)
        windows = windows_of(config, term)
        point_NH, naive_NKH = forecast_share(model, windows, job, rank, world)
        for who, forecasts in (("the model's forecast", point_NH), ("seasonal naive's forecast", naive_NKH)):
            bad = np.flatnonzero(~np.isfinite(forecasts.reshape(len(windows), -1)).all(axis=1))
            if bad.size:
                label = windows.label[bad[0]]
                raise EvalError(f"{key}: {who} of item {label['item_id']} (window from {label['start']}, after "
                                f"{len(windows.input[bad[0]]['target'])} points) is not finite ({bad.size} such "
                                "windows)")
        if rank != 0:
            continue
        naive_rows[key] = result_row(key, NAIVE_NAME, score(windows, naive_NKH), config.domain,
                                     config.num_variates)
        write_table(out / NAIVE_TABLE, naive_rows)
        model_rows[key] = result_row(key, job.model_name, score(windows, point_NH), config.domain,
                                     config.num_variates)
        write_table(out / MODEL_TABLE, model_rows)
        m, s = model_rows[key], naive_rows[key]
        progress(f"[{n}/{len(todo)}] {key}: {len(windows)} windows of {config.prediction_length(term)} points "
                 f"({config.windows(term)} per series), MASE {m[MASE]:.4f} (naive {s[MASE]:.4f}), CRPS "
                 f"{m[CRPS]:.4f} (naive {s[CRPS]:.4f}), {time.perf_counter() - started:.1f} s")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return headline(out)


def forecast_share(model, windows, job: GiftEvalJob, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's share of the windows forecast by the model ([N, H]) and seasonal naive ([N, 10, H]), then
    everyone's gathered (every process gets all)."""
    pl = windows.config.prediction_length(windows.term)
    contexts = windows.contexts(job.context_length)
    batches = length_batches(np.array([len(c) for c in contexts]), job.batch_size)
    mine = np.concatenate(batches[rank::world]) if batches[rank::world] else np.zeros(0, dtype=np.int64)
    point = forecast_contexts(model, [contexts[i] for i in mine], [pl], job.batch_size)[pl]
    naive = seasonal_naive([windows.histories[i] for i in mine], pl, seasonality(windows.config.freq))
    shares = [(mine, point, naive)]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (mine, point, naive))
    point_NH = np.empty((len(windows), pl), dtype=np.float32)
    naive_NKH = np.empty((len(windows), naive.shape[1], pl), dtype=naive.dtype)
    for rows, p, s in shares:
        point_NH[rows], naive_NKH[rows] = p, s
    return point_NH, naive_NKH
