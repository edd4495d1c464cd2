"""`timemoe-train` as a new user meets it, through the installed command from a directory outside the checkout: a
config error is one line and leaves nothing behind, also when the corpus shows it after Hydra made the run
directory; a misspelt key gets the group's closest keys; the first line names the run directory, and a checkpoint
folder given back as run.dir is refused with the path to give; the run's log holds what the terminal showed, bar
or no bar; DeepSpeed's one-time op build is announced; experiment=moe_vs_dense runs on a Time-300B-layout corpus as
the README writes it."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
sys.path.insert(0, str(Path(__file__).parent))
from train_launch import cycles_corpus, worker_env  # noqa: E402

BIN = Path(sys.executable).parent
TINY = ["data=synthetic", "data.max_length=48", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "logger=none", "checkpoint.interval=2"]


def train(cwd: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "timemoe-train"), *args], cwd=cwd, env=env or worker_env(), capture_output=True,
                          text=True, timeout=900, **kw)


def said(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("timemoe-train")]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, line", [
    (["trainer.max_step=10"],
     "timemoe-train: trainer.max_step: no such key in trainer; did you mean trainer.max_steps or "
     "trainer.max_bad_steps?"),
    (["+trainer.max_step=10"],  # what Hydra itself suggests: the group's dataclass has no such field either
     "timemoe-train: TrainConfigError: trainer.max_step: no such key in trainer; did you mean trainer.max_steps or "
     "trainer.max_bad_steps?"),
    (["logger.wandb.mod=online"], "timemoe-train: logger.wandb.mod: no such key in logger.wandb; did you mean "
                                  "logger.wandb.mode?"),
    (["trainr.max_steps=10"], "timemoe-train: trainr: no such key in the config; did you mean trainer?"),
    (["trainer.max_steps=0"], "timemoe-train: TrainConfigError: trainer.max_steps=0: must be a positive integer"),
], ids=["misspelt", "added", "nested", "group", "bad-value"])
def test_a_config_error_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, line):
    proc = train(tmp_path, *TINY, *args)
    assert proc.returncode == 2 and said(proc) == [line], proc.stdout + proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no run directory, .hydra, .lock or log


def test_a_corpus_that_does_not_fit_the_config_is_one_line_and_leaves_nothing(tmp_path):
    """The mixture names a domain the corpus lacks: found when the corpus is read, after Hydra made the run
    directory, which goes again; no "starting a new run" before the error."""
    cycles_corpus(tmp_path, points=600, channels=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = train(tmp_path, "data.path=prepared", "data.max_length=48", "logger=none", "data.mixture_weights={web: 1}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert said(proc) == ["timemoe-train: DataError: prepared/manifest.json: mixture_weights.web = 1.0: no domain of "
                          "that name in the corpus; it has ['energy']"], proc.stdout + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/


def test_a_refused_launch_leaves_an_existing_run_as_it_was(tmp_path):
    first = train(tmp_path, *TINY, "trainer.max_steps=2", "run.dir=run")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = files(tmp_path / "run")
    proc = train(tmp_path, *TINY, "trainer.max_steps=2", "run.dir=run", "optim.lr=-1")
    assert proc.returncode == 2 and said(proc) == ["timemoe-train: TrainConfigError: optim.lr=-1.0: must be > 0"]
    assert files(tmp_path / "run") == kept  # .hydra/ not overwritten by the command that never ran


def test_the_first_line_names_the_run_directory_and_a_checkpoint_folder_is_refused(tmp_path):
    first = train(tmp_path, *TINY, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert said(first)[0] == f"timemoe-train: starting a new run in {run_dir}"
    assert not any("building DeepSpeed" in line for line in said(first))  # built before: the cache has it
    kept = files(run_dir)
    for given, what in ((run_dir / "checkpoints", "is the checkpoint folder of a run"),
                        (run_dir / "checkpoints" / "step00000002", "is a checkpoint (step 2)")):
        proc = train(tmp_path, *TINY, "trainer.max_steps=4", f"run.dir={given}")
        assert proc.returncode == 2 and said(proc) == [
            f"timemoe-train: NotARunDir: run.dir={given} {what}, not a run directory; to continue that run give its "
            f"directory: run.dir={run_dir}"], proc.stdout + proc.stderr[-3000:]
        assert files(run_dir) == kept  # nothing nested in the checkpoints
    again = train(tmp_path, *TINY, "trainer.max_steps=4", f"run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert said(again)[0] == f"timemoe-train: resuming from step 2 ({run_dir / 'checkpoints' / 'step00000002'})"


def test_on_a_terminal_the_log_holds_the_start_lines_progress_and_end_summary(tmp_path):
    """stderr a terminal: the bar is drawn there and the progress lines go to the log only; every line on stdout
    is in the log too, in order."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    drawn = []
    proc = subprocess.Popen([str(BIN / "timemoe-train"), *TINY, "trainer.max_steps=4", "logger.progress_interval=2",
                             "run.dir=run"], cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=follower,
                            text=True)
    os.close(follower)

    def drain():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other side closed
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=900)
    reader.join(timeout=60)
    os.close(leader)
    assert proc.returncode == 0, b"".join(drawn)[-3000:]
    assert b"train: 100%" in b"".join(drawn)  # the bar
    shown = [line for line in out.splitlines() if line.startswith(("timemoe-train: ", "checkpoint "))]
    logged = [line.split(" - ", 1)[1] for line in (tmp_path / "run" / "timemoe-train.log").read_text().splitlines()
              if "][timemoe_train.train][" in line]
    assert not any(line.startswith("step ") for line in out.splitlines())
    assert [line for line in logged if not line.startswith("step ")] == shown and len(shown) >= 9, (shown, logged)
    assert [line.split()[1] for line in logged if line.startswith("step ")] == ["1/4", "2/4", "4/4"]


def test_a_first_run_says_it_is_building_deepspeeds_op_before_the_silent_minute(tmp_path):
    """An empty extension cache: the line comes before the build, right after the start summary; the run is
    stopped there (the build itself is DeepSpeed's)."""
    cache = tmp_path / "extensions"
    proc = subprocess.Popen([str(BIN / "timemoe-train"), *TINY, "trainer.max_steps=2", "run.dir=run"], cwd=tmp_path,
                            env=worker_env(TORCH_EXTENSIONS_DIR=str(cache)), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "DeepSpeed" in line:
                break
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    ours = [line for line in lines if line.startswith("timemoe-train: ")]
    assert ours[0].startswith("timemoe-train: starting a new run in ") and ours[-1] == (
        f"timemoe-train: building DeepSpeed's CPU communication op into {cache / 'deepspeed_shm_comm'} (once: later "
        "runs load it; about a minute)"), lines


@pytest.mark.slow
def test_moe_vs_dense_runs_on_a_time300b_corpus_as_the_readme_writes_it(tmp_path):
    """The README's command on a corpus `timemoe-prep --source time300b` packed (energy, finance, nature, web; no
    healthcare, no synthetic), with only the size of a test added: both arms train."""
    from test_prep_time300b import make_corpus

    make_corpus(tmp_path / "Time-300B")
    prep = subprocess.run([str(BIN / "timemoe-prep"), "--source", "time300b", "--input", "Time-300B", "--output",
                           "corpus", "--workers", "1", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    size = ["trainer.seed=0", "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
            "data.max_length=64", "data.normalization_excludes=8", "logger.progress=false"]
    proc = train(tmp_path, "experiment=moe_vs_dense", "data.path=corpus/", "hydra.sweep.dir=multirun/moe_vs_dense",
                 *size)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = sorted(p.parents[2].name for p in (tmp_path / "multirun" / "moe_vs_dense").glob("*/checkpoints/*/meta.json"))
    assert len(done) == 2 and {name.startswith("arm-") for name in done} == {True}, done


def test_a_checkpoint_folder_elsewhere_is_named_and_hydras_own_paths_resolve_before_the_run(tmp_path):
    """The check before Hydra writes anything resolves the config as the run will (${hydra:runtime.output_dir}
    included): a valid command is never refused by it."""
    proc = train(tmp_path, *TINY, "trainer.max_steps=1", "run.dir=run", "checkpoint.dir=${hydra:runtime.output_dir}/ck")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert said(proc)[0] == f"timemoe-train: starting a new run in {tmp_path / 'run'}; checkpoints in " \
                            f"{tmp_path / 'run' / 'ck'}"


def test_a_refused_job_of_a_sweep_leaves_no_folder_and_the_jobs_before_it_stay(tmp_path):
    proc = train(tmp_path, "-m", *TINY, "trainer.max_steps=2", "optim.lr=1e-3,-1", "hydra.sweep.dir=sweep")
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert said(proc)[-1] == "timemoe-train: TrainConfigError: optim.lr=-1.0: must be > 0", said(proc)
    jobs = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert len(jobs) == 1 and "__optim.lr-0.001__" in jobs[0].name, jobs  # the refused job's folder went again
    assert (jobs[0] / "checkpoints" / "latest").read_text() == "step00000002"
