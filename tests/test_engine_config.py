"""What the run hands DeepSpeed and what it resolves by itself: bf16 with fp32 gradient accumulation and
reduction, `precision: auto`, the attention path of unpacked data, and install requirements equal to the versions
the expert-parallel seam accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from timemoe_train.data.config import DataConfig
from timemoe_train.model import TimeMoeConfig
from timemoe_train.train.config import (CheckpointConfig, LoggerConfig, OptimConfig, ParallelConfig, RunConfig,
                                        TrainConfigError, TrainerConfig)
from timemoe_train.train.engine import deepspeed_config
from timemoe_train.train.synthetic import SyntheticDataConfig

REPO = Path(__file__).resolve().parents[1]


def run(precision="fp32", zero_stage=1, data=None, **model) -> RunConfig:
    return RunConfig(model=TimeMoeConfig.preset("tiny", **model), data=data or SyntheticDataConfig(max_length=64),
                     parallel=ParallelConfig(zero_stage=zero_stage), optim=OptimConfig(),
                     trainer=TrainerConfig(precision=precision, global_batch_size=8, micro_batch_size=4),
                     checkpoint=CheckpointConfig(), logger=LoggerConfig())


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(zero_stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config(run("bf16", zero_stage), gas=2)
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    parsed = DeepSpeedConfig(config)  # what the engine will read from it
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.communication_data_type == torch.float32


def test_fp32_config_leaves_the_data_types_alone():
    config = deepspeed_config(run("fp32"), gas=2)
    assert config["bf16"] == {"enabled": False}
    assert "data_types" not in config and "communication_data_type" not in config


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_deepspeed_clips_only_at_zero_3(zero_stage):
    """Below ZeRO-3 the optimizer clips on the device (DeepSpeed's ZeRO-1/2 clip reads the norm back per group);
    tests/test_train_parallel.py shows every stage clipping alike."""
    config = deepspeed_config(run(zero_stage=zero_stage), gas=2)
    assert config["gradient_clipping"] == (OptimConfig().clip_grad if zero_stage == 3 else 0.0)


def test_bf16_at_zero_stage_0_is_refused():
    with pytest.raises(TrainConfigError, match=r"trainer.precision='bf16': bf16 needs parallel.zero_stage >= 1"):
        run("bf16", zero_stage=0).validate(world_size=1)


def test_zero_stage_left_unset_is_0_for_one_fp32_process_else_1():
    def stage(precision, world_size):
        r = run(precision, zero_stage=None)
        r.validate(world_size=world_size)
        return r.parallel.zero_stage
    assert (stage("fp32", 1), stage("bf16", 1), stage("fp32", 2)) == (0, 1, 1)
    assert ParallelConfig().zero_stage is None


def test_precision_auto_follows_the_device():
    assert TrainerConfig(precision="auto", device="cpu").precision == "fp32"
    assert TrainerConfig(precision="auto", device="cuda").precision == "bf16"
    assert TrainerConfig().precision == ("bf16" if torch.cuda.is_available() else "fp32")
    assert TrainerConfig(precision="fp32", device="cuda").precision == "fp32"
    with pytest.raises(TrainConfigError, match="trainer.precision='fp16'"):
        run("fp16").validate(world_size=1)


def test_unpacked_data_attends_causally_and_packed_data_refuses_causal(tmp_path):
    unpacked = run(data=DataConfig(path=str(tmp_path), packing=False))
    assert unpacked.model.attn_impl == "causal"
    assert run(data=DataConfig(path=str(tmp_path))).model.attn_impl == "auto"
    with pytest.raises(TrainConfigError, match="model.attn_impl='causal'"):
        run(attn_impl="causal").validate(world_size=1)


def test_install_requirements_are_the_versions_check_versions_accepts(monkeypatch):
    from timemoe_train.train import ep_adapter

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {r.name: r.specifier for r in map(Requirement, deps)}
    for name, version in ep_adapter.TESTED_VERSIONS.items():
        assert str(pinned[name]) == f"=={version}", f"pyproject.toml {name}{pinned[name]} vs check_versions() {version}"
    ep_adapter.check_versions()  # the installed ones pass
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.19.1")
    with pytest.raises(RuntimeError, match="tested with"):
        ep_adapter.check_versions()
