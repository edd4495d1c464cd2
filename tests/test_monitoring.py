"""What a run reports about its experts, and where W&B settings come from: an expert that receives no tokens gives
a finite imbalance in metrics.jsonl and in the offline W&B run (read back from its .wandb file), load vectors are
W&B histograms, all domains share one labelled heatmap, and WANDB_* variables win unless the config says
otherwise."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from timemoe_train.model import TimeMoeConfig
from timemoe_train.train.config import LoggerConfig, WandbConfig
from timemoe_train.train.metrics import StepStats, domain_heatmaps, expert_load_metrics
from timemoe_train.train.monitor import Monitor, wandb_settings


def step_with_an_idle_expert(config: TimeMoeConfig) -> dict:
    """One step's reduced sums where the router never picks the last expert (and favours expert 0)."""
    N, E = 24, config.num_experts
    logits_NE = torch.randn(N, E, generator=torch.Generator().manual_seed(0))
    logits_NE[:, 0] += 3.0
    logits_NE[:, -1] = -1e9
    out = SimpleNamespace(loss=torch.tensor(0.5), aux_loss=torch.tensor(1.0), head_losses=torch.ones(4),
                          router_logits=[logits_NE] * config.num_hidden_layers)
    batch = {"sequence_ids": torch.zeros(2, N // 2, dtype=torch.long),
             "domain_ids": torch.zeros(2, N // 2, dtype=torch.long)}
    stats = StepStats(config, num_domains=1, device="cpu")
    stats.add(out, batch)
    return stats.reduce(torch.zeros(()), stop_requested=False).read()


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: W&B ships the message classes but no reader in
    0.31; the file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of pieces, each with a CRC-32 of its
    type byte and data). Reading stops at a torn piece: a killed process's last one."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        piece = data[pos + 7:pos + 7 + length]
        if (length == 0 and kind == 0) or len(piece) < length or zlib.crc32(bytes([kind]) + piece) != crc:
            break
        chunks += piece
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def history_row(record) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the run directory's one offline W&B run."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while b"expert_imbalance" not in path.read_bytes():  # W&B's service finishes writing after finish()
        assert time.monotonic() < deadline, "W&B never wrote the step"
        time.sleep(0.2)
    return [history_row(r) for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def test_an_idle_expert_gives_a_finite_imbalance_in_metrics_and_wandb(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = TimeMoeConfig.preset("tiny")
    summary = step_with_an_idle_expert(config)
    record = {"step": 1, "loss": summary["loss"], "lr": 1e-3, "tokens_per_s": 1.0,
              **expert_load_metrics(summary["load_LE"])}
    share_E = summary["load_LE"][0] / summary["load_LE"][0].sum()
    assert share_E[-1] == 0  # the collapse the figure exists to show
    assert record["expert_imbalance/layer0"] == pytest.approx(float(share_E.max()) * config.num_experts)
    assert record["experts_idle/layer0"] == 1

    monitor = Monitor(tmp_path, LoggerConfig(progress=False), True, {"model": "tiny"}, 10, 0)
    assert monitor.wandb.settings.mode == "offline"  # nothing in the environment or config: offline
    monitor.log(record)
    monitor.close()
    (written,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(written["expert_imbalance/layer1"]) and written["expert_imbalance/layer1"] > 1
    (row,) = wandb_history(tmp_path)
    assert row["expert_imbalance/layer0"] == pytest.approx(record["expert_imbalance/layer0"])
    assert row["experts_idle/layer1"] == 1
    # the load vector is a histogram with one bin per expert, its height the expert's share
    assert row["expert_load/layer0/_type"] == "histogram"
    assert row["expert_load/layer0/bins"] == list(range(config.num_experts + 1))
    assert row["expert_load/layer0/values"] == pytest.approx(record["expert_load/layer0"])


def test_balanced_and_collapsed_routing():
    balanced = expert_load_metrics(torch.full((1, 4), 5.0))
    assert (balanced["expert_imbalance/layer0"], balanced["experts_idle/layer0"]) == (1.0, 0)
    collapsed = expert_load_metrics(torch.tensor([[0.0, 9.0, 0.0, 0.0]]))
    assert (collapsed["expert_imbalance/layer0"], collapsed["experts_idle/layer0"]) == (4.0, 3)
    assert expert_load_metrics(torch.zeros(1, 4))["expert_imbalance/layer0"] is None  # nothing routed (dense)


@pytest.mark.parametrize("env, config, want", [
    ({}, {}, {"mode": "offline", "project": "timemoe-train"}),
    ({"WANDB_MODE": "online", "WANDB_PROJECT": "p"}, {}, {"mode": None, "project": None}),  # W&B reads them
    ({"WANDB_MODE": "online"}, {"mode": "disabled"}, {"mode": "disabled"}),  # set explicitly: the config wins
    ({"WANDB_DIR": "/somewhere"}, {"project": "mine"}, {"dir": None, "project": "mine"}),
], ids=["nothing-set", "environment", "config-wins", "wandb-dir"])
def test_wandb_settings_respect_the_environment(tmp_path, env, config, want):
    settings = wandb_settings(WandbConfig(**config), tmp_path, env)
    assert {k: settings[k] for k in want} == want
    if "WANDB_DIR" not in env:
        assert settings["dir"] == str(tmp_path)


def test_one_heatmap_with_every_domain_labelled_with_values():
    load_DLE = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(1))
    fig = domain_heatmaps(load_DLE, ["energy", "nature", "web"], "steps to 100")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["energy", "nature", "web"]
    assert all(ax.get_xlabel() == "expert" for ax in panels) and panels[0].get_ylabel() == "layer"
    share = load_DLE[2, 1] / load_DLE[2, 1].sum()
    texts = [t.get_text() for t in panels[2].texts]
    assert len(texts) == 2 * 4 and texts[4:] == [f"{100 * v:.0f}" for v in share.tolist()]


# --- one history in metrics.jsonl and in W&B, across a kill and a fallback -------------------------------------------
sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import worker_env  # noqa: E402

BIN = Path(sys.executable).parent
RUN = ["data=synthetic", "data.max_length=48", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
       "logger.progress=false", "logger.heatmap_interval=0", "checkpoint.interval=2", "checkpoint.keep_last=10"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def launch(run_dir: Path, max_steps: int, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """`timemoe-train` on the run; with `kill_after`, killed by kill -9 once it has logged that many steps. W&B's
    service writes the offline file every WANDB__TRANSACTION_LOG_FLUSH_INTERVAL seconds (15 by default, 0.2 here)
    and a kill loses what it had not written yet: the trainer is frozen (SIGSTOP) for that long first, so that the
    comparison is of what W&B received."""
    logged = len(metrics(run_dir))
    env = worker_env(WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.2")
    env.pop("WANDB_SERVICE", None)  # set by an in-process wandb.init of another test: its service, not ours
    proc = subprocess.Popen([str(BIN / "timemoe-train"), *RUN, f"run.dir={run_dir}", f"trainer.max_steps={max_steps}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if kill_after is not None:
            deadline = time.monotonic() + 600
            while len(metrics(run_dir)) < logged + kill_after:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGSTOP)
            time.sleep(2)
            proc.kill()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert kill_after is not None or proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# What identifies a record: its step, its loss, and its measured step time, which differs between the launches
# that ran the step (the loss does not: a resumed run repeats the uninterrupted one exactly).
FIELDS = ("loss", "step_time_s")


def metrics_history(run_dir: Path) -> list[tuple]:
    """metrics.jsonl as its readers take it: a record marked `restarted_from_step: k` replaces every earlier record
    of a step after k."""
    kept = []
    for record in metrics(run_dir):
        if "restarted_from_step" in record:
            kept = [row for row in kept if row[0] <= record["restarted_from_step"]]
        kept.append((record["step"], *(record[f] for f in FIELDS)))
    return kept


def synced_history(runs: list) -> list[tuple]:
    """The history W&B's server holds once the run's offline folders are synced in the order they were written:
    a folder whose run record branches off the same run at step k (a rewind) truncates the history after k; a
    step not above the last one kept is dropped (W&B's steps only increase)."""
    history = []
    for run, rows in runs:
        branch = run.branch_point
        if branch.run == run.run_id and branch.metric == "_step":
            history = [row for row in history if row[0] <= branch.value]
        for row in rows:
            if not history or row["_step"] > history[-1][0]:
                history.append((row["_step"], *(row[f] for f in FIELDS)))
    return history


def resumed_from(proc: subprocess.CompletedProcess) -> int:
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("timemoe-train: resuming from step ")]
    return int(line.split()[4])


@pytest.mark.slow
def test_wandb_history_equals_metrics_after_a_kill_and_after_a_fallback(tmp_path):
    """Offline W&B, the default. Launch 1 is killed (kill -9) with steps logged past its last checkpoint; launch 2
    resumes from that checkpoint (k) and runs to k+4; the newest checkpoint is then damaged, so launch 3 falls back
    to the one at k+2 and runs to k+6. Each launch after the first rewinds the W&B run to the step it resumed from:
    synced in order, the run's history is metrics.jsonl's, every step once, the abandoned ones gone."""
    run_dir = tmp_path / "run"
    launch(run_dir, 1000, kill_after=5)
    k = int((run_dir / "checkpoints" / "latest").read_text()[len("step"):])
    second = launch(run_dir, k + 4)
    assert resumed_from(second) == k and (run_dir / "checkpoints" / f"step{k + 4:08d}").is_dir(), second.stdout
    damaged = run_dir / "checkpoints" / f"step{k + 4:08d}" / "trainer_state_rank00000.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    third = launch(run_dir, k + 6)
    assert resumed_from(third) == k + 2 and f"step{k + 4:08d} is not used" in third.stderr, third.stderr[-3000:]

    kept = metrics_history(run_dir)
    assert [row[0] for row in kept] == list(range(1, k + 7))
    folders = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    runs = []
    for path in folders:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs.append((run, [history_row(r) for r in records if r.WhichOneof("record_type") == "history"]))
    runs.sort(key=lambda run_rows: run_rows[0].start_time.ToNanoseconds())
    assert len(runs) == 3 and len({run.run_id for run, _ in runs}) == 1, folders
    # Launch 3 re-played steps launch 2 had logged: without the rewinds W&B would keep launch 2's.
    assert {row["_step"] for row in runs[1][1]} & {row["_step"] for row in runs[2][1]} == {k + 3, k + 4}
    assert synced_history(runs) == kept
    assert [(run.branch_point.run, run.branch_point.value) for run, _ in runs] == [
        ("", 0), (runs[0][0].run_id, k), (runs[0][0].run_id, k + 2)]


def test_a_refused_rewind_logs_to_a_new_run_and_says_so(tmp_path, monkeypatch, capsys):
    """Online, a server without W&B's rewind refuses `resume_from`: the launch goes on in a new run (whose id the
    next checkpoints carry), in one line; nothing else changes."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_DISABLED", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    real_init, calls = wandb.init, []

    def init(**kwargs):
        calls.append(kwargs.get("resume_from"))
        if kwargs.get("resume_from"):
            raise wandb.errors.CommError("failed to rewind run: run not found")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monitor = Monitor(tmp_path, LoggerConfig(progress=False), True, {}, 10, 4, wandb_id="abc123")
    monitor.close()
    assert calls == ["abc123?_step=4", None] and monitor.wandb_id not in (None, "abc123")
    assert capsys.readouterr().out == ("W&B could not rewind run abc123?_step=4 (failed to rewind run: run not "
                                       "found); logging to a new run from here\n")
