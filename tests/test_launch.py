"""launch/: the per-node torchrun commands (dry run), the SLURM script's flow with stand-in srun/scontrol, and the
Hydra sweep config against a throw-away Hydra app."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "launch" / "run.py"
# Variables the launcher reads: cleared so that the machine's own settings cannot leak into a case.
LAUNCH_ENV = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_CONF",
              "RDZV_IS_HOST", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    return {**env, **extra}


def dry_run(*args, **env):
    out = subprocess.run([sys.executable, str(RUN), "--dry-run", *args], env=clean_env(**env), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    return shlex.split(lines[0])


def flags(cmd):
    """torchrun's options as a dict (flags without a value map to True), the module and the trainer's args."""
    start = cmd.index("torch.distributed.run") + 1
    m = cmd.index("-m", start)
    opts, i = {}, start
    while i < m:
        if i + 1 < m and not cmd[i + 1].startswith("--"):
            opts[cmd[i]] = cmd[i + 1]
            i += 2
        else:
            opts[cmd[i]] = True
            i += 1
    return opts, cmd[m + 1], cmd[m + 2:]


STOP_SIGNALS = "SIGHUP,SIGQUIT"  # torchrun's own handler: the rest of its set; the launcher passes on the others
OVERRIDES = ["data.path=/data/time300b", "parallel.expert_parallel_size=8", "trainer.max_steps=100000",
             "checkpoint.dir=/ckpt/run 1"]


@pytest.mark.parametrize("node_rank", [0, 1])
def test_two_nodes_of_eight_gpus_from_env(node_rank):
    cmd = dry_run("--", *OVERRIDES, NNODES="2", NPROC_PER_NODE="8", NODE_RANK=str(node_rank),
                  MASTER_ADDR="10.0.0.1", MASTER_PORT="29611", RDZV_ID="exp42")
    opts, module, overrides = flags(cmd)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert opts == {"--nproc_per_node": "8", "--nnodes": "2", "--node_rank": str(node_rank),
                    "--rdzv_backend": "c10d", "--rdzv_endpoint": "10.0.0.1:29611", "--rdzv_id": "exp42",
                    "--signals_to_handle": STOP_SIGNALS}
    assert module == "timemoe_train.train"
    assert overrides == OVERRIDES  # the space inside the last one survives quoting


@pytest.mark.parametrize("node_id", [0, 1])
def test_slurm_environment(node_id):
    cmd = dry_run("trainer.max_steps=10", SLURM_JOB_NODELIST="gpu-a[017-018]", SLURM_JOB_NUM_NODES="2",
                  SLURM_NODEID=str(node_id), SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="123456")
    opts, _, overrides = flags(cmd)
    assert (opts["--nnodes"], opts["--node_rank"], opts["--nproc_per_node"]) == ("2", str(node_id), "8")
    assert opts["--rdzv_endpoint"] == "gpu-a017:29500" and opts["--rdzv_id"] == "123456"
    assert overrides == ["trainer.max_steps=10"]
    # Explicit settings beat SLURM's.
    opts, _, _ = flags(dry_run(SLURM_JOB_NODELIST="n1", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_ID="9",
                               SLURM_GPUS_ON_NODE="8", MASTER_ADDR="10.9.9.9", NPROC_PER_NODE="2"))
    assert (opts["--rdzv_endpoint"], opts["--nproc_per_node"]) == ("10.9.9.9:29500", "2")


def test_network_namespaces():
    common = dict(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="10.77.0.1")
    for rank, addr, iface, is_host in ((0, "10.77.0.1", "vA", "1"), (1, "10.77.0.2", "vB", "0")):
        cmd = dry_run(**common, NODE_RANK=str(rank), LOCAL_ADDR=addr, GLOO_SOCKET_IFNAME=iface,
                      RDZV_CONF="join_timeout=60")
        assert cmd[0] == f"GLOO_SOCKET_IFNAME={iface}"
        opts, _, _ = flags(cmd)
        assert opts["--local_addr"] == addr
        assert opts["--rdzv_conf"] == f"is_host={is_host},join_timeout=60"
    opts, _, _ = flags(dry_run(**common, NODE_RANK="1", LOCAL_ADDR="10.77.0.2", RDZV_IS_HOST="1"))
    assert opts["--rdzv_conf"] == "is_host=1"


def test_single_node_is_standalone():
    opts, module, overrides = flags(dry_run("--nproc-per-node", "4", "--module", "my.job", "a=1"))
    assert opts == {"--nproc_per_node": "4", "--standalone": True, "--signals_to_handle": STOP_SIGNALS}
    assert (module, overrides) == ("my.job", ["a=1"])


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "2 nodes need a rendezvous host"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "node rank 2 is outside 0..1"),
    ({"NNODES": "two"}, "nnodes='two': not an integer"),
])
def test_bad_settings(env, message):
    out = subprocess.run([sys.executable, str(RUN), "--dry-run"], env=clean_env(NPROC_PER_NODE="1", **env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


def test_first_host_of_slurm_nodelists():
    from timemoe_train.launch import first_host

    assert first_host("node7") == "node7"
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("a1,b[2-3]") == "a1"
    assert first_host("rack[4,6]-n") == "rack4-n"


# --- launch/slurm.sbatch with stand-ins for srun and scontrol ------------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's own options, run the command once per node as SLURM would (SLURM_NODEID set).
while [[ $1 == --* ]]; do shift; done
echo "srun started" >> "$FAKE_LOG"
echo "grace ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}" >> "$FAKE_LOG.env"
if [[ -n "${FAKE_SRUN_HANG:-}" ]]; then
    sleep 60 &
    trap 'echo "srun got TERM" >> "$FAKE_LOG"; kill $!; exit 143' TERM
    wait
fi
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def sbatch_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, FAKE_LOG=str(tmp_path / "log"),
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="timemoe", SLURM_JOB_NODELIST="node[01-02]",
                     SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", **extra)


@pytest.mark.parametrize("run_dir", [None, "/scratch/runs/big"])
def test_sbatch_dry_run_prints_each_nodes_command(tmp_path, run_dir):
    extra = {"RUN_DIR": run_dir} if run_dir else {}
    out = subprocess.run(["bash", "launch/slurm.sbatch", "data.path=/d", "trainer.max_steps=7"], cwd=REPO,
                         env=sbatch_env(tmp_path, DRY_RUN="1", **extra), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(commands) == 2
    for node, cmd in enumerate(commands):
        opts, module, overrides = flags(cmd)
        assert (opts["--nnodes"], opts["--node_rank"], opts["--nproc_per_node"]) == ("2", str(node), "8")
        assert (opts["--rdzv_endpoint"], opts["--rdzv_id"], opts["--rdzv_backend"]) == ("node01:29500", "4242", "c10d")
        # The run directory comes from the overrides (the same after a requeue or a resubmission) unless RUN_DIR
        assert overrides == [*([f"run.dir={run_dir}"] if run_dir else []), "data.path=/d", "trainer.max_steps=7"]
    # torchrun waits this long for a checkpoint save before it kills the trainers; SLURM warns earlier than that
    assert (tmp_path / "log.env").read_text().split() == ["grace", "240"]
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@300" in script
    # SLURM opens the log before the script runs: no folder it would have to create
    assert "#SBATCH --output=%x-%j.out" in script


def test_sbatch_usr1_stops_workers_then_requeues(tmp_path):
    env = sbatch_env(tmp_path, FAKE_SRUN_HANG="1")
    log = tmp_path / "log"
    proc = subprocess.Popen(["bash", "launch/slurm.sbatch"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "srun started" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "srun stand-in never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().splitlines() == ["srun started", "srun got TERM", "scontrol requeue 4242"]
    assert "requeueing job 4242" in proc.stdout.read()


# --- launch/hydra: the sweep config, composed with the real configs by a Hydra app that only records each job --
APP = """
import json, os, hydra
from hydra.core.hydra_config import HydraConfig
from timemoe_train.train.__main__ import CONFIG_DIR  # also registers the run_name resolver

@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg):
    with open(os.environ["SWEEP_LOG"], "a") as f:
        f.write(json.dumps({"experts": cfg.model.num_experts, "lr": cfg.optim.lr, "data": cfg.data.path,
                            "out": HydraConfig.get().runtime.output_dir, "checkpoints": cfg.checkpoint.dir}) + "\\n")

main()
"""


def sweep(tmp_path: Path, *overrides: str) -> list[dict]:
    """The jobs the recording app saw for one sweep command, in order."""
    log = tmp_path / "runs.jsonl"
    log.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, str(tmp_path / "app.py"), *overrides], cwd=tmp_path,
                         env={**os.environ, "SWEEP_LOG": str(log)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_experts_lr_sweep(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    runs = sweep(tmp_path, f"hydra.searchpath=[file://{REPO}/launch/hydra]", "+sweep=experts_lr", "data.path=/d")
    assert sorted((r["experts"], r["lr"]) for r in runs) == sorted((e, lr) for e in (4, 8) for lr in (3e-4, 1e-3, 3e-3))
    assert all(r["data"] == "/d" for r in runs)
    # every job its own directory runs/sweeps/<the sweep's name>/<its overrides>: the sweep again resumes each
    assert len({r["out"] for r in runs}) == 6
    (sweep_dir,) = {Path(r["out"]).parent for r in runs}
    assert sweep_dir.parent == tmp_path / "runs" / "sweeps" and (sweep_dir / "multirun.yaml").is_file()
    for r in runs:
        name = Path(r["out"]).name
        assert f"model.num_experts-{r['experts']}" in name and "+sweep-experts_lr" in name, name


def test_two_sweeps_never_share_a_directory_and_the_same_sweep_finds_its_own(tmp_path):
    """Hydra writes multirun.yaml into the sweep directory: each sweep command has its own, named after it."""
    (tmp_path / "app.py").write_text(APP)
    first = sweep(tmp_path, "-m", "optim.lr=1e-3,3e-3", "data.path=/d")
    second = sweep(tmp_path, "-m", "model.num_experts=4,8", "data.path=/d")
    dirs = [{Path(r["out"]).parent for r in runs} for runs in (first, second)]
    assert all(len(d) == 1 for d in dirs) and dirs[0] != dirs[1], dirs
    for d, values in zip(dirs, ("1e-3,3e-3", "4,8")):
        assert values in (next(iter(d)) / "multirun.yaml").read_text()
    assert sweep(tmp_path, "-m", "optim.lr=1e-3,3e-3", "data.path=/d") == first


def test_slurm_cluster_config_is_a_submitit_launcher_override():
    yaml = pytest.importorskip("yaml")
    text = (REPO / "launch" / "hydra" / "cluster" / "slurm.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = yaml.safe_load(text)
    assert cfg["defaults"] == [{"override /hydra/launcher": "submitit_slurm"}]
    # Parameter names of hydra-submitit-launcher's SlurmLauncher (1.2).
    known = {"submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
             "name", "partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
             "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout", "additional_parameters",
             "array_parallelism", "setup"}
    assert set(cfg["hydra"]["launcher"]) <= known
    assert cfg["hydra"]["launcher"]["tasks_per_node"] == cfg["hydra"]["launcher"]["gpus_per_node"]


# --- docker/README.md: the documented `docker run` commands keep a run's files on the mounted storage -------------
def docker_runs() -> list[list[str]]:
    text = (REPO / "docker" / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("docker run")]


def test_documented_docker_runs_keep_checkpoints_metrics_and_wandb_on_the_mounted_volume():
    """Stand-in for `docker run`: the container's working directory is the Dockerfile's WORKDIR, the trainer's
    config is resolved as the documented command would resolve it (`--cfg job`), and every file the run writes
    (its run directory: checkpoints, metrics.jsonl, W&B) must lie under a `-v` mount, not in the container."""
    from timemoe_train.train.config import WandbConfig
    from timemoe_train.train.monitor import wandb_settings

    workdir = Path(next(line.split()[1] for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()
                        if line.startswith("WORKDIR")))
    commands = docker_runs()
    assert len(commands) == 2
    for cmd in commands:
        mounts = [Path(cmd[i + 1].split(":")[1]) for i, word in enumerate(cmd) if word == "-v"]
        env = {cmd[i + 1].split("=")[0]: cmd[i + 1].partition("=")[2] for i, w in enumerate(cmd) if w == "-e"}
        overrides = [w for w in cmd[cmd.index("launch/run.py") + 1:] if "=" in w]
        resolved = subprocess.run([sys.executable, "-m", "timemoe_train.train", *overrides, "--cfg", "job",
                                   "--resolve"], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert resolved.returncode == 0, resolved.stderr
        yaml = pytest.importorskip("yaml")
        cfg = yaml.safe_load(resolved.stdout)
        run_dir = workdir / cfg["run"]["dir"]
        assert any(m in run_dir.parents for m in mounts), (run_dir, mounts)
        assert (workdir / cfg["checkpoint"]["dir"]).parent == run_dir  # checkpoints inside the run directory
        # metrics.jsonl is written to the run directory, and so are the W&B files unless WANDB_DIR says otherwise
        settings = wandb_settings(WandbConfig(**{k: v for k, v in cfg["logger"]["wandb"].items()
                                                 if k != "_target_"}), run_dir, env)
        assert settings["dir"] == str(run_dir)
        assert settings["mode"] == (None if env.get("WANDB_MODE") else "offline")  # -e WANDB_MODE is honoured
    assert "WANDB_MODE" not in (REPO / "docker" / "Dockerfile").read_text()  # the image does not decide it


WORKER = """
import os, signal, sys, time
from pathlib import Path

def stop(signum, frame):
    Path(os.environ["OUT"], f"stopped.{os.environ['RANK']}").write_text(signal.Signals(signum).name)
    sys.exit(0)

for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, stop)
Path(os.environ["OUT"], f"ready.{os.environ['RANK']}").touch()
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_the_launcher_passes_a_stop_on_to_the_workers_and_exits_0_when_they_did(tmp_path, sig):
    """SIGUSR1 (SLURM's warning) too; torchrun itself is not signalled, waits for the workers' exit 0, and the
    launcher says what it did in one line."""
    (tmp_path / "stop_worker.py").write_text(WORKER)
    env = clean_env(OUT=str(tmp_path), PYTHONPATH=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(RUN), "--nproc-per-node", "2", "--module", "stop_worker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready.{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert [(tmp_path / f"stopped.{r}").read_text() for r in range(2)] == [sig.name] * 2
    assert f"timemoe-train: {sig.name} passed on to 2 trainer processes" in err
    assert "Traceback" not in err


def test_the_launcher_prints_a_user_error_once_and_exits_2(tmp_path):
    """Every rank finds the same bad key: one line from `timemoe-train --nproc-per-node 2`, none of torchrun's."""
    proc = subprocess.run([str(Path(sys.executable).with_name("timemoe-train")), "--nproc-per-node", "2",
                           "data=synthetic", "trainer.max_steps=abc"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if "timemoe-train" in line]
    assert ours == ["timemoe-train: TrainConfigError: trainer.max_steps='abc': must be int"], proc.stderr[-3000:]
    assert not any(word in proc.stderr for word in ("Traceback", "ChildFailedError", "error_file", "exitcode"))


def test_plain_torchrun_prints_a_user_error_once(tmp_path):
    """Under plain torchrun (not our launcher) each node's local rank 0 says the error, exit 2; the other rank waits
    and is stopped by torchrun without a word. torchrun's own failure report follows (its exit status 1)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                           "-m", "timemoe_train.train", "data=synthetic", "bad.key=1"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("timemoe-train")]
    assert ours == ["timemoe-train: bad: no such key in the config; its keys: model, data, parallel, optim, trainer, "
                    "logger, run, checkpoint"], proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 1
    root_cause = proc.stderr.split("Root Cause")[1]
    assert "local_rank: 0" in root_cause and "exitcode  : 2" in root_cause, proc.stderr[-3000:]


def test_under_plain_torchrun_an_error_only_another_rank_met_is_said_after_the_wait(monkeypatch, capsys):
    """Local rank 1 waits for torchrun to stop it (local rank 0 failing the same way); still running after the
    wait, it says the error itself, and its stop signals no longer ask for a save."""
    import timemoe_train.train.__main__ as app

    handlers, waits = {}, []
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(app.LAUNCHED, raising=False)
    monkeypatch.setattr(app.signal, "signal", lambda sig, handler: handlers.update({sig: handler}))
    monkeypatch.setattr(app.time, "sleep", waits.append)
    with pytest.raises(SystemExit) as exit_:
        app._user_error("DataError: only rank 1 reads this")
    assert exit_.value.code == 2 and waits == [app._SAY_ONCE_WAIT_S]
    assert handlers == {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.SIG_DFL}
    assert capsys.readouterr().err == "timemoe-train: DataError: only rank 1 reads this\n"


def test_a_torchrun_signal_that_hides_behind_its_metrics_wrapper_is_still_one_line(monkeypatch, capsys):
    """The race CI met: a signal torchrun handles (here SIGHUP) landed inside torch's metrics wrapper before its
    timer was set, and torchrun raised that wrapper's UnboundLocalError with the SignalException as context. Other
    errors still propagate."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from timemoe_train.launch import run_torchrun

    def stopped_in_wrapper(args):
        try:
            raise SignalException("got signal: 1", sigval=signal.SIGHUP)
        except SignalException:
            raise UnboundLocalError("cannot access local variable 'start' where it is not associated with a value")
    monkeypatch.setattr(torch.distributed.run, "main", stopped_in_wrapper)
    assert run_torchrun([]) == 128 + signal.SIGHUP
    assert "timemoe-train: SIGHUP: torchrun stopped the trainer processes" in capsys.readouterr().err

    def failed(args):
        raise RuntimeError("rendezvous timed out")
    monkeypatch.setattr(torch.distributed.run, "main", failed)
    with pytest.raises(RuntimeError, match="rendezvous timed out"):
        run_torchrun([])


# --- the real trainer under the launcher -----------------------------------------------------------------------------
TINY = ["data=synthetic", "data.max_length=48", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "logger=none", "logger.progress=false"]
# Each trainer's checkpoint writes wait a minute first (once $SLOW_SAVE_MARK names a file, which they touch): a save
# still running when the second Ctrl-C comes.
SLOW_SAVE = """
import os, time
if os.environ.get("SLOW_SAVE_MARK"):
    import torch
    _save = torch.save

    def save(*args, **kwargs):
        open(os.environ["SLOW_SAVE_MARK"], "a").close()
        time.sleep(60)
        return _save(*args, **kwargs)

    torch.save = save
"""


def trainer_env(**extra):
    env = clean_env(DS_BUILD_OPS="0", OMP_NUM_THREADS="1", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}


@pytest.mark.slow
def test_a_second_ctrl_c_under_the_launcher_is_one_line_and_status_130(tmp_path):
    """As with one process: the first Ctrl-C asks for a save; a second one, more than a second later and while the
    trainers are still saving, ends them unsaved: one line, exit 130 (no torchrun failure report)."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_SAVE)
    mark = tmp_path / "saving"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("timemoe-train")), "--nproc-per-node", "2", *TINY,
                             "trainer.max_steps=100000", "checkpoint.interval=0", "checkpoint.async_save=false",
                             "run.dir=run"], cwd=tmp_path, env=trainer_env(PYTHONPATH=str(tmp_path),
                                                                            SLOW_SAVE_MARK=str(mark)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        metrics = tmp_path / "run" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher's process group
        first = time.monotonic()
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(max(0.0, first + 1.5 - time.monotonic()))
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if "timemoe-train" in line] == [
        "timemoe-train: SIGINT passed on to 2 trainer processes (a stop request: each saves its current step and "
        "exits)", "timemoe-train: second interrupt: exiting without saving"], err[-3000:]
    assert not any(word in err for word in ("Traceback", "ChildFailedError", "exitcode")), err[-3000:]


@pytest.mark.slow
def test_a_sweep_after_the_launchers_options_runs_each_job_on_its_processes(tmp_path):
    """`-m` after the launcher's options is Hydra's, for every trainer: both jobs of the sweep, 2 processes each."""
    proc = subprocess.run([str(Path(sys.executable).with_name("timemoe-train")), "--nproc-per-node", "2", "-m",
                           "optim.lr=1e-3,2e-3", *TINY, "trainer.max_steps=2", "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, env=trainer_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("*/checkpoints/step00000002/meta.json"))
    assert len(jobs) == 2, sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert {json.loads(meta.read_text())["world_size"] for meta in jobs} == {2}
    lrs = {line.split(":")[1].strip() for meta in jobs
           for line in (meta.parents[2] / ".hydra" / "config.yaml").read_text().splitlines()
           if line.startswith("  lr:")}
    assert lrs == {"0.001", "0.002"}
