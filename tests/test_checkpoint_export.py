"""timemoe-export of a bf16 run (one process, in this one, ZeRO-1): the weights it writes are the optimizer's fp32
master copy, read from the checkpoint's elastic part, not the bf16 module copy widened."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import TINY  # noqa: E402

pytestmark = pytest.mark.slow


def test_export_of_a_bf16_run_is_its_fp32_master_weights(tmp_path, monkeypatch):
    from deepspeed.utils import safe_get_full_fp32_param

    from timemoe_train.export.cli import export
    from timemoe_train.model.hf_layout import released_view
    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps=", "checkpoint.interval="))] + [
        "trainer.precision=bf16", "parallel.zero_stage=1", "trainer.max_steps=3", "checkpoint.interval=0",
        f"checkpoint.dir={tmp_path / 'ckpt'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = make_trainer(cfg, tmp_path / "run")
    try:
        trainer.fit()
        model = trainer.module.model
        masters = released_view(model, {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()})
        module_copy = released_view(model, {n: p.detach().float().clone() for n, p in model.named_parameters()})
    finally:
        trainer.close()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

    exported = load_file(export(tmp_path / "ckpt", tmp_path / "hf", dtype="fp32") / "model.safetensors")
    assert sorted(exported) == sorted(masters)
    assert all(torch.equal(exported[k], masters[k]) for k in masters)
    assert any(not torch.equal(exported[k], module_copy[k]) for k in masters)  # the bf16 copy would differ
    default = load_file(export(tmp_path / "ckpt", tmp_path / "hf16") / "model.safetensors")  # the run's precision
    assert all(default[k].dtype == torch.bfloat16 and torch.equal(default[k], masters[k].bfloat16()) for k in masters)
