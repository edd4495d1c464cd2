"""The trainer under torchrun (CPU, gloo, tiny model, fp32): expert parallelism and ZeRO-3 equal one rank, expert
gradients are reduced over the right group, kill -9 + resume equals an uninterrupted run, non-finite steps are
skipped, an EP=2 checkpoint exports to an HF directory that forecasts like the training model.

Each launched run is a module fixture used by several tests (a launch costs ~25 s of imports and set-up)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import TINY, launch, launch_ok, metrics, torchrun_command, worker_env  # noqa: E402

from timemoe_train.export.cli import gather_hf_state  # noqa: E402

pytestmark = pytest.mark.slow
SECRET = "wandb-key-that-must-not-leak-1234"


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The HF-layout weights every compared run starts from (trainer.init_from_hf), and the loss they give on the
    first global batch, computed here with the model's own forward on the synthetic stream."""
    from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
    from timemoe_train.train.synthetic import SyntheticDataConfig

    hf_dir = tmp_path_factory.mktemp("start")
    torch.manual_seed(123)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny"))
    model.save_pretrained(hf_dir)
    batches = iter(SyntheticDataConfig(max_length=48, seed=0).build_train_loader(0, 1, 8, 2))
    with torch.no_grad():
        losses = [model(inputs_BT=b["inputs"], labels_BT=b["labels"], loss_mask_BT=b["loss_mask"],
                        sequence_ids_BT=b["sequence_ids"]).loss for b in (next(batches) for _ in range(4))]
    return TINY + [f"trainer.init_from_hf={hf_dir}"], torch.stack(losses).mean().item()


@pytest.fixture(scope="module")
def single(tmp_path_factory, start):
    """EP=1 on one process with the native MoE layer (4 micro-batches accumulated): the reference."""
    return launch_ok(1, tmp_path_factory.mktemp("single"), start[0] + ["parallel.zero_stage=1"])


@pytest.fixture(scope="module")
def ep2(tmp_path_factory, start):
    """EP=2 on 2 processes, ZeRO-2, W&B offline with an API key in the environment; forecasts at the end."""
    run_dir = tmp_path_factory.mktemp("ep2")
    overrides = start[0] + ["parallel=expert", "parallel.zero_stage=2", "logger=default", "logger.progress=false"]
    return launch_ok(2, run_dir, overrides, "--forecast", str(run_dir / "forecast.pt"),
                     env=worker_env(WANDB_API_KEY=SECRET))


@pytest.fixture(scope="module")
def ep2_dp2(tmp_path_factory, start):
    """EP=2 x DP=2 on 4 processes, ZeRO-0 (the trainer clips by the exact norm); gradient check at the end."""
    run_dir = tmp_path_factory.mktemp("ep2dp2")
    return launch_ok(4, run_dir, start[0] + ["parallel=expert", "parallel.zero_stage=0"],
                     "--grad-check", str(run_dir / "grad_check.json"))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, start):
    """DP=2 with ZeRO-3 (parameters partitioned, no expert parallelism): export reads its gathered weights."""
    return launch_ok(2, tmp_path_factory.mktemp("zero3"), start[0] + ["parallel.zero_stage=3"])


def hf_weights(run_dir: Path, tag: str) -> dict:
    root = run_dir / "checkpoints"
    return gather_hf_state(root / tag, root)[1]


def assert_same_training(ref_dir: Path, run_dir: Path, first_loss: float, tol: float = 1e-5):
    ref, run = metrics(ref_dir), metrics(run_dir)
    assert [r["step"] for r in run] == [r["step"] for r in ref] == list(range(1, 7))
    assert abs(run[0]["loss"] - first_loss) <= 1e-6  # started from the init_from_hf weights, at any layout
    for a, b in zip(ref, run):
        assert abs(a["loss"] - b["loss"]) <= tol, (a["step"], a["loss"], b["loss"])
        assert abs(a["aux_loss"] - b["aux_loss"]) <= tol
        # The exact global norm under expert parallelism; above the 0.05 threshold, so every step was clipped.
        assert abs(a["grad_norm"] - b["grad_norm"]) <= tol * a["grad_norm"] and a["grad_norm"] > 0.05
    for tag in ("step00000003", "step00000006"):
        want, got = hf_weights(ref_dir, tag), hf_weights(run_dir, tag)
        assert sorted(want) == sorted(got)
        worst = max((want[k] - got[k]).abs().max().item() for k in want)
        assert worst <= tol, f"{tag}: parameters differ by {worst:.2e}"
    first, last = hf_weights(ref_dir, "step00000003"), hf_weights(ref_dir, "step00000006")
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3  # training moved the weights


def test_one_process_by_default_trains_like_zero1(start, single, tmp_path_factory):
    """One fp32 process defaults to ZeRO-0 with DeepSpeed's all-reduce off (no flat copies): the same training."""
    run_dir = launch_ok(1, tmp_path_factory.mktemp("single_default"), start[0])
    assert json.loads((run_dir / "checkpoints" / "step00000006" / "meta.json").read_text())["zero_stage"] == 0
    assert_same_training(single, run_dir, start[1])


def test_ep2_matches_single_rank(start, single, ep2):
    assert_same_training(single, ep2, start[1])


def test_ep2_dp2_matches_single_rank(start, single, ep2_dp2):
    assert_same_training(single, ep2_dp2, start[1])


def test_zero3_matches_single_rank(start, single, zero3):
    assert_same_training(single, zero3, start[1])


def test_expert_gradients_are_reduced_over_the_expert_data_parallel_group(ep2_dp2):
    """Ranks 0 and 1 hold different experts: reducing expert gradients over all four ranks (as for dense weights)
    would add expert 0's gradient to expert 2's. The engine must match the reference, the wrong sum must not."""
    check = json.loads((ep2_dp2 / "grad_check.json").read_text())
    assert check["experts_checked"] == 12
    assert check["engine"] < 1e-5 and check["expert_dp_group"] < 1e-5, check
    assert check["all_ranks"] > 1e-2, check


def test_checkpoint_layout_and_no_secrets(ep2):
    root = ep2 / "checkpoints"
    assert (root / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000003", "step00000006"]
    tag = root / "step00000006"
    names = {p.name for p in tag.iterdir()}
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)} <= names
    assert {"trainer_state_rank00000.pt", "trainer_state_rank00001.pt", "meta.json", "config.yaml"} <= names
    meta = json.loads((tag / "meta.json").read_text())
    assert (meta["ep_size"], meta["world_size"], meta["step"]) == (2, 2, 6)
    # W&B ran offline next to metrics.jsonl; the API key from the environment is nowhere in what the run wrote.
    assert list((ep2 / "wandb").glob("offline-run-*"))
    assert list((ep2 / "expert_load_by_domain").glob("step00000006.png"))  # all domains in one figure
    for path in [*ep2.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    record = metrics(ep2)[-1]
    for key in ("step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "head_loss/h64",
                "expert_load/layer1", "expert_imbalance/layer0"):
        assert key in record
    assert abs(sum(record["expert_load/layer1"]) - 1) < 1e-3


def test_resume_after_kill_9_matches_uninterrupted_run(start, ep2, tmp_path):
    """Same run as `ep2`, killed with SIGKILL right after checkpoint 3 is published, then resumed to step 6."""
    overrides = start[0] + ["parallel=expert", "parallel.zero_stage=2"]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_command(2, run_dir, overrides, "--hang-after", "3"), env=worker_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    marks = [run_dir / "checkpoints" / f"hanging.{rank}" for rank in range(2)]
    deadline = time.time() + 300
    try:
        while not all(m.exists() for m in marks) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:  # torchrun starts its workers in sessions of their own: kill them by pid, then torchrun
        for pid_file in run_dir.glob("pid.*"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert all(m.exists() for m in marks), proc.stderr.read().decode()[-4000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoints").symlink_to(run_dir / "checkpoints")
    launch_ok(2, resumed_dir, overrides)
    straight, resumed = metrics(ep2), metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


def test_sigterm_saves_the_current_step_and_exits(tmp_path):
    """SLURM preemption: SIGTERM reaches torchrun, which forwards it to the workers; they finish the step, save it
    and exit (torchrun itself reports the signal)."""
    overrides = TINY + ["parallel=expert", "trainer.max_steps=1000", "checkpoint.interval=0"]
    proc = subprocess.Popen(torchrun_command(2, tmp_path, overrides), env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    last = metrics(tmp_path)[-1]["step"]
    assert f"stop requested by signal: saved step {last}, exiting" in output, output[-4000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    assert 2 <= last < 1000


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    """Rank 0 alone sees a NaN in step 2 (both ranks skip it, the weights stay), then in steps 4 and 5: with
    max_bad_steps=2 the run stops with a message saying why."""
    overrides = TINY + ["parallel=expert", "trainer.max_bad_steps=2", "checkpoint.interval=1",
                        "checkpoint.keep_last=10"]
    proc = launch(2, tmp_path, overrides, "--nan-steps", "2,4,5")
    assert proc.returncode != 0
    assert "non-finite for 2 steps in a row (trainer.max_bad_steps=2)" in proc.stderr
    records = metrics(tmp_path)
    assert [(r["step"], r["skipped"]) for r in records] == [(1, False), (2, True), (3, False), (4, True), (5, True)]
    assert records[1]["loss"] is None and records[2]["skipped_total"] == 1
    before, after = hf_weights(tmp_path, "step00000001"), hf_weights(tmp_path, "step00000002")
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = hf_weights(tmp_path, "step00000003")
    assert any(not torch.equal(before[k], moved[k]) for k in before)


def elastic_optimizer_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The Adam moments and step count the elastic part holds, read in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(tag_dir / "elastic").read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if not k.startswith("model.")}
    dcp.load(state, checkpoint_id=tag_dir / "elastic", no_dist=True)
    return state


def test_a_checkpoint_of_only_skipped_steps_resumes_like_the_uninterrupted_run(start, tmp_path):
    """Steps 1 and 2 skipped (NaN data on rank 0), so Adam has no state when step 2 is saved: the checkpoint holds
    the starting weights, zero moments and step count 0. Resumed from it at the same layout (DeepSpeed's files)
    and at another (1 process, native layer: the elastic part), steps 3-4 are those of the uninterrupted run."""
    overrides = start[0] + ["parallel=expert", "trainer.max_steps=4", "checkpoint.interval=2",
                            "checkpoint.keep_last=5"]
    straight = launch_ok(2, tmp_path / "straight", overrides, "--nan-steps", "1,2")
    records = metrics(straight)
    assert [(r["step"], r["skipped"]) for r in records] == [(1, True), (2, True), (3, False), (4, False)]
    step2 = straight / "checkpoints" / "step00000002"
    saved = elastic_optimizer_state(step2)
    assert saved.pop("optimizer_step").item() == 0 and saved
    assert all(k.startswith(("exp_avg.", "exp_avg_sq.")) and not v.any() for k, v in saved.items())

    def resumed(name: str, nproc: int, layout: list[str]) -> Path:
        run_dir = tmp_path / name
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(step2, run_dir / "checkpoints" / step2.name)
        for file in ("latest", "lineage"):
            (run_dir / "checkpoints" / file).write_text(step2.name + "\n")
        launch_ok(nproc, run_dir, overrides + layout)
        assert [r["step"] for r in metrics(run_dir)] == [3, 4]
        return run_dir

    same = resumed("same-layout", 2, [])
    for a, b in zip(records[2:], metrics(same)):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    want, got = hf_weights(straight, "step00000004"), hf_weights(same, "step00000004")
    assert all(torch.equal(want[k], got[k]) for k in want)

    other = resumed("one-process", 1, ["parallel.expert_parallel_size=1", "model.moe_impl=native"])
    for a, b in zip(records[2:], metrics(other)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    got = hf_weights(other, "step00000004")
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, f"parameters after step 4 differ by {worst:.2e}"
    first = hf_weights(straight, "step00000002")
    assert max((first[k] - want[k]).abs().max().item() for k in want) > 1e-3  # steps 3-4 moved the weights


def test_export_of_ep2_checkpoint_forecasts_like_the_training_model(ep2, tmp_path):
    """timemoe-export gathers both EP ranks' experts; the reference model loaded from the HF directory (remote code,
    as a serving stack loads it) and our own loader forecast what the EP=2 training model forecast."""
    transformers = pytest.importorskip("transformers")
    from train_run import FORECAST_CONTEXT

    from timemoe_train.model import TimeMoeForPrediction

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "timemoe_train.export.cli", str(ep2 / "checkpoints"), str(out)],
                          capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4
    trained = torch.load(ep2 / "forecast.pt", weights_only=True)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours = TimeMoeForPrediction.from_pretrained(out).eval()
    for model in (remote, ours):
        torch.testing.assert_close(model.forecast(FORECAST_CONTEXT, 40), trained, atol=1e-5, rtol=1e-5)
    assert (trained - FORECAST_CONTEXT.mean(1, keepdim=True)).abs().max() > 0.1  # not stuck at the mean
