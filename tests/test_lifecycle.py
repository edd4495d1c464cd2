"""The run lifecycle as a user meets it, with the real commands: `torchrun -m timemoe_train.train` on 2 processes
with loader workers (data.num_workers=2) on a corpus written by `timemoe-prep`, stopped by SIGTERM to torchrun,
SIGTERM to every process (SLURM's step signal) and SIGINT (Ctrl-C); each time the identical command continues from
the saved step, and the pieces together equal one uninterrupted run. Hydra multirun of the real trainer in one
process equals the same runs done separately.

Shared launches: one uninterrupted reference, then one chain (start, TERM, re-run, TERM to all, re-run, INT,
re-run to the end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import cycles_corpus, worker_env  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MAX_STEPS = 60
# Every key here is part of the run's name except trainer.max_steps, checkpoint.interval and the logger keys.
OVERRIDES = ["model=tiny", "data.max_length=48", "data.num_workers=2", "trainer.global_batch_size=8",
             "trainer.micro_batch_size=2", "optim.warmup_steps=5", "logger=none", "logger.progress=false",
             f"trainer.max_steps={MAX_STEPS}", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    cycles_corpus(folder, points=17_420, channels=7)
    return folder / "prepared"


def command(corpus: Path) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "timemoe_train.train",
            f"data.path={corpus}", *OVERRIDES]


def start_line(stdout: str) -> str:
    """The first line timemoe-train itself prints (rank 0). Under torchrun the other ranks' library notices share
    stdout and may come before it: they start their imports while rank 0 looks for a checkpoint."""
    return next(line for line in stdout.splitlines() if line.startswith("timemoe-train:"))


def run_dir(cwd: Path) -> Path:
    (found,) = (cwd / "runs").iterdir()
    return found


def records(cwd: Path) -> list[dict]:
    path = cwd / "runs"
    files = list(path.glob("*/metrics.jsonl")) if path.is_dir() else []
    return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(corpus), cwd=cwd, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert start_line(proc.stdout) == f"timemoe-train: starting a new run in {run_dir(cwd)}"
    assert [r["step"] for r in records(cwd)] == list(range(1, MAX_STEPS + 1))
    return records(cwd)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def send_term_to_torchrun(proc):
    proc.send_signal(signal.SIGTERM)


def send_term_to_every_process(proc):
    """As SLURM stops a job step: every process at once — torchrun, the trainers and their loader workers."""
    trainers = children(proc.pid)
    workers = [w for t in trainers for w in children(t)]
    assert len(trainers) == 2 and len(workers) == 4, (trainers, workers)
    for pid in [proc.pid, *trainers, *workers]:
        os.kill(pid, signal.SIGTERM)


def send_ctrl_c(proc):
    """A terminal's Ctrl-C: SIGINT to the foreground process group, torchrun's (its workers have their own)."""
    os.killpg(proc.pid, signal.SIGINT)


def interrupted_segment(corpus: Path, cwd: Path, stop) -> tuple[subprocess.CompletedProcess, int]:
    """Run the command in `cwd` until it has logged two new steps, then `stop` it; the step it started from."""
    start = len(records(cwd))
    proc = subprocess.Popen(command(corpus), cwd=cwd, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    try:
        while len(records(cwd)) < start + 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.05)
        stop(proc)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), start


@pytest.mark.parametrize("stops", [(send_term_to_torchrun, send_term_to_every_process, send_ctrl_c)],
                         ids=["term-torchrun,term-all,ctrl-c"])
def test_stopped_runs_save_the_current_step_and_the_same_command_continues(corpus, reference, tmp_path, stops):
    for stop in stops:
        proc, start = interrupted_segment(corpus, tmp_path, stop)
        done = records(tmp_path)
        last = done[-1]["step"]
        assert start + 2 <= last < MAX_STEPS, (stop.__name__, start, last)
        ckpt = run_dir(tmp_path) / "checkpoints"
        first = start_line(proc.stdout)
        if start:
            assert first == f"timemoe-train: resuming from step {start} ({ckpt / f'step{start:08d}'})", stop
        else:
            assert first == f"timemoe-train: starting a new run in {ckpt.parent}"
        assert f"stop requested by signal: saved step {last}, exiting" in proc.stdout, (stop, proc.stderr[-4000:])
        assert (ckpt / "latest").read_text() == f"step{last:08d}", stop.__name__  # the step it stopped at
        # The loader workers ignored the signal and were shut down by the trainer; no trainer traceback.
        assert "DataLoader worker" not in proc.stderr and "Traceback" not in proc.stderr.replace(
            torchrun_traceback(proc.stderr), ""), (stop.__name__, proc.stderr[-4000:])
        # Each trainer exited 0; torchrun, itself signalled, re-raises the signal (its own one traceback, status 1).
        assert proc.returncode == 1 and "got signal:" in proc.stderr, (stop.__name__, proc.returncode)
        assert "failed" not in proc.stderr.lower(), proc.stderr[-4000:]
    final = subprocess.run(command(corpus), cwd=tmp_path, env=worker_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-4000:]
    assert start_line(final.stdout).startswith(f"timemoe-train: resuming from step {last} ")
    resumed = records(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(reference, resumed):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]


def torchrun_traceback(stderr: str) -> str:
    """The one traceback torchrun prints when it was signalled itself (its SignalException), if any."""
    start = stderr.rfind("Traceback (most recent call last)")
    return stderr[start:] if start >= 0 and "SignalException" in stderr[start:] else ""


# --- Hydra multirun of the real trainer in one process ------------------------------------------------------------
MULTIRUN = ["data=synthetic", "data.max_length=48", "model=tiny", "parallel=expert", "parallel.expert_parallel_size=1",
            "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "logger=none",
            "logger.progress=false"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "timemoe_train.train", *args], cwd=cwd, env=worker_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_multirun_of_the_trainer_equals_the_runs_done_separately(tmp_path):
    """Two jobs in one process (megatron's MoE layer, so megatron's parallel state, DeepSpeed's expert groups and
    the process group are all set up and torn down per job), and the same sweep through hydra-submitit-launcher's
    local launcher with 2 tasks per job (as on SLURM: no torchrun, each task finds its rank from submitit) and the
    experts split over them, against the same two runs as separate one-process commands."""
    ep1 = MULTIRUN
    ep2 = [o.replace("expert_parallel_size=1", "expert_parallel_size=2") for o in MULTIRUN]
    sweeps = {"basic": ep1, "submitit": ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *ep2]}
    jobs = {}
    for name, overrides in sweeps.items():
        (tmp_path / name).mkdir()
        cli(tmp_path / name, "-m", *overrides, "optim.lr=0.001,0.003")
        (sweep_dir,) = (tmp_path / name / "runs" / "sweeps").iterdir()
        jobs[name] = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0] != ".")
        assert len(jobs[name]) == 2 and "optim.lr-0.001" in jobs[name][0].name, jobs[name]
        assert all((job / "checkpoints" / "step00000003").is_dir() for job in jobs[name])
    for i, lr in enumerate(("0.001", "0.003")):
        (tmp_path / lr).mkdir()
        cli(tmp_path / lr, *ep1, f"optim.lr={lr}")
        (alone,) = (tmp_path / lr / "runs").iterdir()
        assert len(losses(alone)) == 3
        assert jobs["basic"][i].name == alone.name  # a job of a sweep is the run of its overrides: resumable alone
        assert losses(jobs["basic"][i]) == losses(alone), lr
        meta = json.loads((jobs["submitit"][i] / "checkpoints" / "step00000003" / "meta.json").read_text())
        assert (meta["world_size"], meta["ep_size"]) == (2, 2)
        assert losses(jobs["submitit"][i]) == pytest.approx(losses(alone), abs=1e-6), lr
    assert losses(jobs["basic"][0]) != losses(jobs["basic"][1])


def test_a_multirun_under_torchrun_runs_every_job_with_all_its_files_in_the_sweep_dir(tmp_path):
    """Two jobs in the same two torchrun processes, experts split over them: each job builds its process groups on
    a fresh part of torchrun's store (the second job used to read the first's gloo addresses). Everything a job
    writes — Hydra's files, metrics.jsonl, the W&B run, checkpoints — lies in its directory under hydra.sweep.dir."""
    ep2 = [o.replace("expert_parallel_size=1", "expert_parallel_size=2") for o in MULTIRUN if o != "logger=none"]
    sweep = tmp_path / "sweep"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "timemoe_train.train",
                           "-m", *ep2, "optim.lr=0.001,0.003", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("optim.lr-")[1][:5] for j in jobs] == ["0.001", "0.003"], jobs
    for job in jobs:
        assert (job / ".hydra" / "overrides.yaml").is_file() and (job / "wandb").is_dir(), sorted(job.iterdir())
        assert [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
        meta = json.loads((job / "checkpoints" / "step00000003" / "meta.json").read_text())
        assert (meta["world_size"], meta["ep_size"]) == (2, 2)
    assert losses(jobs[0]) != losses(jobs[1])
    assert (sweep / "multirun.yaml").is_file() and not (tmp_path / "runs").exists()


def test_a_printed_run_directory_goes_back_into_the_command_as_it_is(tmp_path):
    """A generated name holds no `=`, `,`, quote, bracket or space even when the overrides do; `run.dir=<the
    printed path>` continues that run, and the full overrides are in the run directory."""
    overrides = [o for o in MULTIRUN if "trainer.max_steps" not in o]
    first = cli(tmp_path, *overrides, "optim.betas=[0.9, 0.95]", "trainer.max_steps=2")
    path = Path(start_line(first.stdout).removeprefix("timemoe-train: starting a new run in "))
    assert path.parent == tmp_path / "runs" and not set(path.name) & set("=,'\"[] "), path.name
    assert "optim.betas=[0.9, 0.95]" in (path / ".hydra" / "overrides.yaml").read_text()
    again = cli(tmp_path, *overrides, "optim.betas=[0.9,0.95]", "trainer.max_steps=3", f"run.dir={path}")
    assert start_line(again.stdout) == f"timemoe-train: resuming from step 2 ({path / 'checkpoints' / 'step00000002'})"
    assert [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- one lineage and one live run per run directory -----------------------------------------------------------------
TINY_TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "timemoe_train.train",
                 *(o for o in MULTIRUN if "max_steps" not in o), "checkpoint.interval=2", "checkpoint.keep_last=2"]


def tiny_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TINY_TORCHRUN, *args], cwd=cwd, env=worker_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_false_sets_the_old_lineage_aside_and_the_plain_command_continues_the_new_one(tmp_path):
    run = tmp_path / "runs" / "x"
    ckpt = run / "checkpoints"
    tiny_run(tmp_path, "run.name=x", "trainer.max_steps=6")
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000006"]
    restart = tiny_run(tmp_path, "run.name=x", "trainer.max_steps=3", "checkpoint.resume=false")
    (aside,) = run.glob("previous-*")
    assert f"the previous checkpoints and metrics moved to {aside}" in restart.stdout
    assert start_line(restart.stdout.split(str(aside))[1]) == f"timemoe-train: starting a new run in {run}"
    again = tiny_run(tmp_path, "run.name=x", "trainer.max_steps=5")
    assert start_line(again.stdout) == f"timemoe-train: resuming from step 3 ({ckpt / 'step00000003'})"
    # The new lineage pruned in its own write order; the old one kept whole, beside it.
    assert (ckpt / "lineage").read_text().split() == ["step00000004", "step00000005"]
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000005"]
    assert steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (aside / "checkpoints").glob("step*")) == ["step00000004", "step00000006"]
    assert steps(aside / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started(cwd: Path, *args: str) -> subprocess.Popen:
    """A long run of TINY_TORCHRUN in `cwd`, returned once it has logged a step."""
    proc = subprocess.Popen([*TINY_TORCHRUN, "run.name=x", "trainer.max_steps=100000", *args], cwd=cwd,
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = cwd / "runs" / "x" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
        time.sleep(0.1)
    return proc


def test_kill_9_of_torchrun_stops_every_process_of_the_run_within_30_s_with_the_step_saved(tmp_path):
    from timemoe_train.checkpoint.resume import resolve_checkpoint

    proc = started(tmp_path)
    run = descendants(proc.pid)
    assert len(run) >= 2, run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in run if alive(pid)], "processes of the run outlived its launcher"
    ckpt = tmp_path / "runs" / "x" / "checkpoints"
    last = steps(tmp_path / "runs" / "x" / "metrics.jsonl")[-1]
    assert resolve_checkpoint(ckpt) == f"step{last:08d}"  # the stop request saved the step it was in, whole


def test_a_second_launch_on_a_live_run_directory_is_refused_in_one_line(tmp_path):
    first = started(tmp_path)
    try:
        # The second through the project launcher: the refusal is its one line, exit 2.
        launcher = [str(BIN / "timemoe-train"), "--nproc-per-node", "2", *TINY_TORCHRUN[5:]]
        second = subprocess.run([*launcher, "run.name=x", "trainer.max_steps=100000"], cwd=tmp_path,
                                env=worker_env(), capture_output=True, text=True, timeout=300)
        ours = [line for line in second.stderr.splitlines() if "timemoe-train" in line]
        assert second.returncode == 2 and len(ours) == 1, second.stderr[-4000:]
        holder = f"timemoe-train: RunInUse: {tmp_path / 'runs' / 'x'} is in use by timemoe-train pid "
        assert ours[0].startswith(holder) and int(ours[0][len(holder):].split()[0]) in children(first.pid), ours
        assert first.poll() is None  # the live run trains on
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
