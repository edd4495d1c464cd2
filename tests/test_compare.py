"""The moe_vs_dense report: per-arm mean ± sample std over seeds, and the jobs it refuses to compare."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from timemoe_train.evaluate import EvalError
from timemoe_train.evaluate.compare import find_jobs, markdown, summarise


def job(arm, seed, loss, mse):
    return {"arm": arm, "seed": seed, "activated_params": 100, "total_params": 400 if arm == "moe" else 100,
            "train_loss": loss, "holdout": 48, "zero_shot": {"ETTh1": {"mse": mse, "mae": mse / 2}},
            "baselines": {"ETTh1": {"seasonal_naive": {"mse": 0.5, "mae": 0.4}, "last_value": {"mse": 1, "mae": 0.7}}},
            "held_out": {"mse": 2 * mse, "mae": mse, "series": 10, "per_domain": {"energy": {}, "nature": {}}}}


def test_mean_and_sample_std_per_arm():
    jobs = [job("moe", s, 0.2 + s / 100, 0.4 + s / 10) for s in range(3)] + \
           [job("dense", s, 0.3, 0.6 + s / 10) for s in range(3)]
    arms = summarise(jobs)
    mean, std = arms["moe"]["figures"]["ETTh1 h96 MSE"]
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.std([0.4, 0.5, 0.6], ddof=1))
    assert arms["dense"]["figures"]["held-out MAE"][0] == pytest.approx(0.7)
    md = markdown(jobs, arms, "cmd")
    assert "| moe | 0,1,2 | 100 | 400 | 0.2100 ± 0.0100 | 0.5000 ± 0.1000 |" in md
    assert "seasonal naive MSE 0.5000" in md


def test_refuses_unfinished_or_foreign_jobs(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    OmegaConf.save({"trainer": {"seed": 0}, "data": {"path": "d", "holdout_points": 48}},
                   tmp_path / "0" / ".hydra" / "config.yaml")
    with pytest.raises(EvalError, match="not a job of experiment=moe_vs_dense"):
        find_jobs(tmp_path)
    OmegaConf.save({"arm": "moe", "trainer": {"seed": 0}, "data": {"path": "d", "holdout_points": 48}},
                   tmp_path / "0" / ".hydra" / "config.yaml")
    with pytest.raises(EvalError, match="no finished checkpoint"):
        find_jobs(tmp_path)
    with pytest.raises(EvalError, match="no job directories"):
        find_jobs(tmp_path / "0")


@pytest.mark.parametrize("arm", ["moe", "dense"])
def test_the_preset_arms_activate_the_same_number_of_parameters(arm):
    from test_train import composed

    from timemoe_train.train.__main__ import run_config
    from timemoe_train.train.metrics import active_params_per_token

    def activated(a):
        run = run_config(composed("experiment=moe_vs_dense", "data.path=x", f"arm={a}", data=None))
        return run.model.use_dense, active_params_per_token(run.model), run.data.holdout_points

    dense, count, holdout = activated(arm)
    assert dense == (arm == "dense") and holdout == 48
    assert count == activated("moe" if arm == "dense" else "dense")[1]
