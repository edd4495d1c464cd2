"""What a run reports about its experts, and where W&B settings come from: an expert that receives no tokens gives
a finite imbalance in metrics.jsonl and in the offline W&B run (read back from its .wandb file), load vectors are
W&B histograms, all domains share one labelled heatmap, and WANDB_* variables win unless the config says
otherwise."""

from __future__ import annotations

import json
import math
import struct
import time
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


def wandb_history(run_dir: Path) -> list[dict]:
    """The history records of the offline run's .wandb file (a LevelDB-style log of protobuf records; W&B ships
    the message classes but no reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while b"expert_imbalance" not in path.read_bytes():  # W&B's service finishes writing after finish()
        assert time.monotonic() < deadline, "W&B never wrote the step"
        time.sleep(0.2)
    data, pos, block, chunks, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


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
