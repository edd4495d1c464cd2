"""Checkpoints under torchrun (CPU, gloo, tiny model, fp32): 8 steps straight at 2 processes EP=2 against 4 steps
there + a resume to 8 under another layout (1 process with the native MoE layer, 4 processes EP=2 x DP=2 at ZeRO-0,
4 processes EP=4, 2 processes EP=2 at ZeRO-2 from ZeRO-1); a damaged newest checkpoint falls back to the previous
one; all damaged stops with an error and writes nothing; a rank killed mid-step under `torchrun --max-restarts 1`,
a re-save killed between its renames and a SLURM requeue onto fewer nodes all resume and finish like the straight
run.

Each launch is a module fixture; the resumes start from copies of the straight run's checkpoints, each with its
step-8 checkpoint damaged in another way (so every resume also shows the fallback)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import REPO, TINY, TORCHRUN, metrics, worker_env  # noqa: E402

from timemoe_train.export.cli import gather_hf_state  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "dist" / "checkpoint_run.py"
# 8 steps, a checkpoint every 4; the schedule does not depend on max_steps (decay_steps), so runs of other
# lengths (the SLURM job) follow it too.
COMMON = [o for o in TINY if not o.startswith(("trainer.max_steps=", "checkpoint.interval=", "logger.heatmap"))] + [
    "trainer.max_steps=8", "checkpoint.interval=4", "checkpoint.keep_last=3", "optim.decay_steps=6",
    "logger.heatmap_interval=0", "parallel=expert"]
STEP4, STEP8 = "step00000004", "step00000008"


def launch(nproc: int, run_dir: Path, overrides: list[str], *options: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "--max-restarts", "1", str(WORKER),
           "--run-dir", str(run_dir), *options, "--", f"checkpoint.dir={run_dir / 'checkpoints'}", *overrides]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=900, cwd=REPO)


def launch_ok(nproc: int, run_dir: Path, overrides: list[str], *options: str) -> subprocess.CompletedProcess:
    proc = launch(nproc, run_dir, COMMON + overrides, *options)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


def last_per_step(run_dir: Path) -> dict[int, dict]:
    """The record of each step that counted (a restarted attempt logs its steps again, later in the file)."""
    return {r["step"]: r for r in metrics(run_dir)}


def weights(run_dir: Path, tag: str = STEP8) -> dict[str, torch.Tensor]:
    root = run_dir / "checkpoints"
    return gather_hf_state(root / tag, root)[1]


def assert_continues_straight(straight: Path, run_dir: Path, steps=range(5, 9)):
    want, got = last_per_step(straight), last_per_step(run_dir)
    assert sorted(got) == sorted(set(got) | set(steps)) and max(got) == 8
    for s in steps:
        assert abs(got[s]["loss"] - want[s]["loss"]) <= 1e-5 * abs(want[s]["loss"]), (s, want[s], got[s])
        assert got[s]["lr"] == pytest.approx(want[s]["lr"], rel=1e-12)
    a, b = weights(straight), weights(run_dir)
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"parameters after step 8 differ by {worst:.2e}"
    first = weights(straight, STEP4)
    assert max((first[k] - a[k]).abs().max().item() for k in a) > 1e-3  # steps 5-8 moved the weights


def copy_checkpoints(straight: Path, run_dir: Path, damage=None) -> Path | None:
    """The straight run's checkpoints; `damage(step-8 dir)` returns the file it damaged."""
    shutil.copytree(straight / "checkpoints", run_dir / "checkpoints")
    return damage(run_dir / "checkpoints" / STEP8) if damage else None


def flip_byte(tag_dir: Path) -> Path:
    path = tag_dir / "elastic" / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def delete_file(tag_dir: Path) -> Path:
    path = tag_dir / "layer_1_expert_2_mp_rank_00_model_states.pt"
    path.unlink()
    return path


def truncate_file(tag_dir: Path) -> Path:
    path = tag_dir / "mp_rank_00_model_states.pt"
    os.truncate(path, path.stat().st_size // 2)
    return path


def assert_fell_back(proc: subprocess.CompletedProcess, damaged: Path):
    """The warning names the damaged file of the step-8 checkpoint, which was then left alone."""
    assert f"checkpoint {damaged.parent.parent if damaged.parent.name == 'elastic' else damaged.parent} is not " \
           f"used: {damaged}: " in proc.stderr, proc.stderr[-4000:]
    assert "falling back to the previous checkpoint" in proc.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2 processes, EP=2, ZeRO-1: 8 steps, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("straight")
    launch_ok(2, run_dir, ["parallel.zero_stage=1"])
    return run_dir


def resumed(tmp_path_factory, straight: Path, nproc: int, overrides: list[str], damage):
    """4 steps of the straight run (its checkpoints, step 8 damaged by `damage`) resumed to 8 at another layout."""
    run_dir = tmp_path_factory.mktemp(damage.__name__)
    damaged = copy_checkpoints(straight, run_dir, damage)
    return run_dir, launch_ok(nproc, run_dir, overrides), damaged


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, straight):
    return resumed(tmp_path_factory, straight, 1, ["parallel.expert_parallel_size=1", "model.moe_impl=native"],
                   flip_byte)


@pytest.fixture(scope="module")
def ep2_dp2(tmp_path_factory, straight):
    return resumed(tmp_path_factory, straight, 4, ["parallel.zero_stage=0"], delete_file)


@pytest.fixture(scope="module")
def ep4(tmp_path_factory, straight):
    return resumed(tmp_path_factory, straight, 4, ["parallel.expert_parallel_size=4"], truncate_file)


def test_resume_on_one_process_with_the_native_layer(straight, one_rank):
    run_dir, proc, damaged = one_rank
    assert_fell_back(proc, damaged)
    assert (f"timemoe-train: weights: resumed from step 4 ({run_dir / 'checkpoints' / STEP4}); layout 2 processes "
            "EP=2 zero_stage=1 moe_impl=megatron → 1 process EP=1 zero_stage=0 moe_impl=native (elastic resume)") in proc.stdout.splitlines()
    assert_continues_straight(straight, run_dir)


def test_resume_at_ep2_dp2_zero0(straight, ep2_dp2):
    run_dir, proc, damaged = ep2_dp2
    assert_fell_back(proc, damaged)
    assert_continues_straight(straight, run_dir)


def test_resume_at_ep4(straight, ep4):
    run_dir, proc, damaged = ep4
    assert_fell_back(proc, damaged)
    assert_continues_straight(straight, run_dir)
    meta = json.loads((run_dir / "checkpoints" / STEP8 / "meta.json").read_text())
    assert (meta["world_size"], meta["ep_size"]) == (4, 4)


def test_rank_killed_mid_step_restarts_and_resumes_at_zero2_from_zero1(straight, tmp_path):
    """The last rank SIGKILLs itself in step 6; torchrun (--max-restarts 1) restarts both, which resume from the
    step-4 checkpoint (written at ZeRO-1, read at ZeRO-2) and finish."""
    copy_checkpoints(straight, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / STEP8)
    (tmp_path / "checkpoints" / "latest").write_text(STEP4)
    launch_ok(2, tmp_path, ["parallel.zero_stage=2"], "--die-in-step", "6")
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps.count(5) == 2 and steps[-4:] == [5, 6, 7, 8], steps  # step 5 ran in both attempts
    assert_continues_straight(straight, tmp_path)


def test_killed_during_a_background_write_resumes_from_the_previous_checkpoint(straight, tmp_path):
    """Checkpoints every 2 steps, written in the background: the last rank is SIGKILLed while the step-6 checkpoint
    is being written and the step loop has already gone on to step 7. torchrun restarts both ranks; step 6 never
    became a checkpoint (its partial directory is removed), so they resume from step 4 and finish like the straight
    run."""
    proc = launch_ok(2, tmp_path, ["parallel.zero_stage=1", "checkpoint.interval=2"], "--die-in-write-of", "6")
    assert re.search(r"checkpoint_run: killed while writing \.tmp-step00000006 at step 7", proc.stderr), \
        proc.stderr[-4000:]
    assert f"timemoe-train: resuming from step 4 ({tmp_path / 'checkpoints' / STEP4})" in proc.stdout
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps[-4:] == [5, 6, 7, 8] and steps.count(5) == 2, steps
    assert_continues_straight(straight, tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("new_copy", ["not yet in place", "torn"])
def test_a_re_save_killed_midway_resumes_from_the_copy_it_set_aside(straight, tmp_path, new_copy):
    """kill -9 in the middle of a re-save of step 4: its old copy set aside as `.old-step00000004`, the new one still
    `.tmp-step00000004`, or in place but torn (no manifest yet). The next start puts the old copy back before it
    looks for a checkpoint, says so, resumes from step 4 and finishes like the straight run."""
    copy_checkpoints(straight, tmp_path)
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / STEP8)
    (root / "latest").write_text(STEP4)
    (root / "lineage").write_text(STEP4 + "\n")
    old = root / f".old-{STEP4}"
    (root / STEP4).rename(old)
    shutil.copytree(old, root / (f".tmp-{STEP4}" if new_copy == "not yet in place" else STEP4))
    if new_copy == "torn":
        (root / STEP4 / "manifest.json").unlink()
    proc = launch_ok(2, tmp_path, ["parallel.zero_stage=1"])
    assert f"timemoe-train: {root / STEP4}: put back the copy a re-save of this step had set aside" in proc.stdout
    assert f"timemoe-train: resuming from step 4 ({root / STEP4})" in proc.stdout
    assert [r["step"] for r in metrics(tmp_path)] == [5, 6, 7, 8]
    assert_continues_straight(straight, tmp_path)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def elastic_payload(tag_dir: Path) -> tuple[dict[str, int], int]:
    """Bytes of tensor data in each file of the elastic part (from DCP's metadata), and in the whole state."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(tag_dir / "elastic").read_metadata()
    per_file: dict[str, int] = {}
    for index, where in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        chunk = next(c for c in entry.chunks if c.offsets == index.offset)
        per_file[where.relative_path] = (per_file.get(where.relative_path, 0)
                                         + math.prod(chunk.sizes) * entry.properties.dtype.itemsize)
    whole = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in metadata.state_dict_metadata.values())
    return per_file, whole


@pytest.mark.parametrize("run", ["straight", "ep4"])
def test_each_rank_writes_its_share_of_the_elastic_state(run, request):
    """2 processes EP=2 and 4 processes EP=4 (ZeRO-1): every rank writes about 1/N of the weights and moments,
    and together exactly the whole state, each element once."""
    run_dir = request.getfixturevalue(run) if run == "straight" else request.getfixturevalue(run)[0]
    nproc = json.loads((run_dir / "checkpoints" / STEP8 / "meta.json").read_text())["world_size"]
    per_file, whole = elastic_payload(run_dir / "checkpoints" / STEP8)
    assert sorted(per_file) == [f"__{r}_0.distcp" for r in range(nproc)]
    assert sum(per_file.values()) == whole
    for name, size in per_file.items():
        assert abs(size - whole / nproc) <= 0.1 * whole / nproc, (name, size, whole / nproc)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_checkpoint_damaged_is_an_error_and_nothing_is_written(straight, tmp_path):
    copy_checkpoints(straight, tmp_path)
    flipped = flip_byte(tmp_path / "checkpoints" / STEP4)
    truncated = truncate_file(tmp_path / "checkpoints" / STEP8)
    before = tree_digest(tmp_path / "checkpoints")
    proc = subprocess.run(
        [sys.executable, "-m", "timemoe_train.train", *COMMON, "parallel.expert_parallel_size=1",
         f"checkpoint.dir={tmp_path / 'checkpoints'}", f"hydra.run.dir={tmp_path / 'run'}"],
        env=worker_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert f"no checkpoint in {tmp_path / 'checkpoints'} verifies" in proc.stderr, proc.stderr[-4000:]
    assert str(flipped) in proc.stderr and str(truncated) in proc.stderr
    assert tree_digest(tmp_path / "checkpoints") == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics(tmp_path / "run")


def test_export_reads_the_same_weights_from_the_elastic_part_and_from_deepspeeds_files(straight, tmp_path):
    copy_checkpoints(straight, tmp_path)
    tag = tmp_path / "checkpoints" / STEP8
    elastic = weights(tmp_path)
    shutil.rmtree(tag / "elastic")
    (tag / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="exported unverified"):
        from_ds = weights(tmp_path)
    assert sorted(elastic) == sorted(from_ds)
    assert all(torch.equal(elastic[k], from_ds[k].float()) for k in elastic)


# --- SLURM: launch/slurm.sbatch with stand-ins for srun (one torchrun per "node", side by side) and scontrol --------
FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's options, start the command once per node at once (SLURM_NODEID set), pass TERM on.
while [[ $1 == --* ]]; do shift; done
echo "srun on $SLURM_NNODES nodes" >> "$FAKE_LOG"
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" & pids+=($!); done
trap 'echo "srun got TERM" >> "$FAKE_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    [[ $rc -ne 0 ]] && status=$rc
done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch_env(tmp_path: Path, nodes: int, restart: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in worker_env().items() if not k.startswith(("SLURM_", "MASTER_", "RDZV_", "NNODES"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, "FAKE_LOG": str(tmp_path / "log"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "timemoe", "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_NNODES": str(nodes), "SLURM_RESTART_COUNT": str(restart), "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RUN_DIR": str(tmp_path / "run")}


def test_slurm_requeue_onto_fewer_nodes_resumes_and_continues(straight, tmp_path):
    """Job 4242 on 2 nodes (1 process each, EP=1 x DP=2) gets USR1 (time limit near): the workers save and exit,
    the job requeues itself; it comes back on 1 node and finishes the run from that checkpoint."""
    run = tmp_path / "run"
    args = ["bash", "launch/slurm.sbatch", *COMMON, "parallel.expert_parallel_size=1", "checkpoint.interval=1"]
    first = subprocess.Popen(args, cwd=REPO, env=sbatch_env(tmp_path, nodes=2, restart=0), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((run / "metrics.jsonl").exists() and metrics(run)):
            assert time.monotonic() < deadline and first.poll() is None, first.stdout.read()[-4000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGUSR1)
        output = first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.kill()
    stopped = metrics(run)[-1]["step"]
    assert stopped < 8, "the run finished before the signal arrived"
    assert (run / "checkpoints" / "latest").read_text() == f"step{stopped:08d}", output[-4000:]
    assert "requeueing job 4242" in output

    second = subprocess.run(args, cwd=REPO, env=sbatch_env(tmp_path, nodes=1, restart=1), capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert (tmp_path / "log").read_text().splitlines() == [
        "srun on 2 nodes", "srun got TERM", "scontrol requeue 4242", "srun on 1 nodes"]
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 9)), steps  # continued right after the step it saved
    meta = json.loads((run / "checkpoints" / STEP8 / "meta.json").read_text())
    assert meta["world_size"] == 1
    want, got = last_per_step(straight), last_per_step(run)
    for s in range(1, 9):
        assert abs(got[s]["loss"] - want[s]["loss"]) <= 1e-5 * abs(want[s]["loss"]), (s, want[s], got[s])
