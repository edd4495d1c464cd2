"""The moe_vs_dense report: per-arm mean ± sample std over seeds, and the jobs it refuses to compare."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from timemoe_train.evaluate import EvalError
from timemoe_train.compare import find_jobs, markdown, summarise


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


def test_one_seed_per_arm_has_no_spread_and_no_gap_verdict():
    jobs = [job("moe", 0, 0.2, 0.4), job("dense", 0, 0.3, 0.6)]
    arms = summarise(jobs)
    assert arms["moe"]["figures"]["ETTh1 h96 MSE"] == (pytest.approx(0.4), None)
    md = markdown(jobs, arms, "cmd")
    assert "| moe | 0 | 100 | 400 | 0.2000 (one seed) | 0.4000 (one seed) |" in md
    assert "1 std" not in md and "± 0.0000" not in md


def job_dir(root, name, cfg, finished=True, cwd="/launch"):
    (root / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, root / name / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"cwd": cwd}}}, root / name / ".hydra" / "hydra.yaml")
    if finished:
        (root / name / "checkpoints").mkdir()
        (root / name / "checkpoints" / "latest").write_text("step00000300")


def study_cfg(arm, seed, **changes):
    cfg = OmegaConf.create({"arm": arm, "arms": {"moe": {"use_dense": False}, "dense": {"use_dense": True}},
                            "model": {"use_dense": "${arms.${arm}.use_dense}", "hidden_size": 64},
                            "trainer": {"seed": seed, "max_steps": 300}, "data": {"path": "d", "holdout_points": 48,
                                                                                  "num_workers": 1},
                            "logger": {"interval": 10}})
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def test_other_runs_and_unfinished_jobs_are_left_out_with_a_note(tmp_path):
    job_dir(tmp_path, "a-plain-run", {"trainer": {"seed": 0}, "data": {"path": "d", "holdout_points": 48}})
    job_dir(tmp_path, "moe-0", study_cfg("moe", 0))
    job_dir(tmp_path, "dense-0", study_cfg("dense", 0, data__num_workers=4, logger__interval=1))
    job_dir(tmp_path, "dense-1", study_cfg("dense", 1), finished=False)
    jobs, notes = find_jobs(tmp_path)
    assert [(j["arm"], j["seed"]) for j in jobs] == [("dense", 0), ("moe", 0)]
    assert jobs[0]["data"] == "/launch/d"  # a relative data.path is the launch directory's (Hydra's runtime.cwd)
    assert notes == [f"{tmp_path / 'a-plain-run'}: skipped, not a job of experiment=moe_vs_dense (no `arm` in "
                     ".hydra/config.yaml)",
                     f"{tmp_path / 'dense-1'}: skipped, no finished checkpoint (checkpoints/latest): still running or "
                     "stopped"]
    for name in ("moe-0", "dense-0", "dense-1"):
        shutil.rmtree(tmp_path / name)
    with pytest.raises(EvalError, match=r"no finished job of experiment=moe_vs_dense.*\n.*a-plain-run: skipped"):
        find_jobs(tmp_path)


@pytest.mark.parametrize("change, key", [({"model__hidden_size": 96}, "model.hidden_size"),
                                         ({"trainer__max_steps": 600}, "trainer.max_steps"),
                                         ({"data__holdout_points": 0}, "data.holdout_points")])
def test_jobs_of_different_studies_are_refused(tmp_path, change, key):
    job_dir(tmp_path, "moe-0", study_cfg("moe", 0))
    job_dir(tmp_path, "moe-1", study_cfg("moe", 1, **change))
    with pytest.raises(EvalError, match=f"moe-1: {key} = .*but .*moe-0 has .*cannot be compared"):
        find_jobs(tmp_path)


def test_the_same_relative_data_path_from_another_directory_is_other_data(tmp_path):
    job_dir(tmp_path, "moe-0", study_cfg("moe", 0))
    job_dir(tmp_path, "dense-0", study_cfg("dense", 0), cwd="/elsewhere")
    with pytest.raises(EvalError, match="data.path = '/launch/d', but .*dense-0 has '/elsewhere/d'"):
        find_jobs(tmp_path)


@pytest.mark.parametrize("arm", ["moe", "dense"])
def test_the_preset_arms_activate_the_same_number_of_parameters(arm):
    from test_train import composed

    from timemoe_train.train.__main__ import run_config

    def activated(a):
        run = run_config(composed("experiment=moe_vs_dense", "data.path=x", f"arm={a}", data=None))
        return run.model.use_dense, run.model.active_params_per_token, run.data.holdout_points

    dense, count, holdout = activated(arm)
    assert dense == (arm == "dense") and holdout == 48
    assert count == activated("moe" if arm == "dense" else "dense")[1]
