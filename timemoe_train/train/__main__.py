"""`timemoe-train`: the Hydra app (also `torchrun … -m timemoe_train.train key=value …`), and with launcher options
first (`--nproc-per-node`, `--nnodes`, …) the torchrun launcher of `timemoe_train.launch`.

    timemoe-train --nproc-per-node 2 experiment=demo data.path=data/prepared

A run lives in `run.dir` (default `runs/<run.name>`, the name made of the command's overrides): the same command
again continues from that directory's latest checkpoint. Exit status: 0 when the run finished or was stopped by
SIGTERM / SIGUSR1 / SIGINT after saving, 2 for a user error (one line on stderr, before any engine start-up),
3 when a checkpoint could not be written (one line naming the rank and the file; every rank stops in the same step
and `latest` still names the previous checkpoint), 130 for a second Ctrl-C (no save), 1 for anything else (a
traceback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..data.errors import DataError
from ..launch import LAUNCH_OPTIONS, LAUNCHED
from ..checkpoint import CheckpointError, CheckpointWriteError, read_meta
from ..model.config import ConfigError
from .config import (RunConfig, TrainConfigError, checked_run_config, no_such_key, omegaconf_message, one_line,
                     run_config)  # noqa: F401 (run_config: timemoe-finetune and the tests import it from here)
from .monitor import scrub
from .preflight import Refused, discard_created
from .report import say
from .run_dir import LockUnsupported, NotARunDir, RunInUse, RunLock, set_aside


def _config_dir() -> Path:
    """A checkout's configs/ (what `make setup` installs in editable mode), else the copy inside the installed
    package (setup.py puts it there). `--config-dir` still adds a user's own directory to Hydra's search path."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "train.yaml").is_file():
        return checkout / "configs"
    return Path(__file__).resolve().parents[1] / "configs"


CONFIG_DIR = _config_dir()
USER_ERRORS = (TrainConfigError, ConfigError, DataError, CheckpointError, FileNotFoundError, RunInUse, NotARunDir,
               LockUnsupported)
WRITE_FAILED = 3  # exit status: a checkpoint could not be written (CheckpointWriteError)
_MAX_NAME = 100
# Under plain torchrun, how long ranks other than a node's local rank 0 wait before saying a user error themselves.
_SAY_ONCE_WAIT_S = 10.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def run_name() -> str:
    """A directory name from the command's overrides (Hydra's `job.override_dirname`, which leaves out the keys
    listed in train.yaml that do not change what is trained, and joins key-value with `-` and items with `__`):
    the same command always gets the same name, e.g. `model.num_experts-4__optim.lr-0.001`. "default" without
    overrides, and for a config composed outside a Hydra app (`hydra.compose`)."""
    from hydra.core.hydra_config import HydraConfig

    return readable_name(HydraConfig.get().job.override_dirname if HydraConfig.initialized() else "")


def readable_name(override_dirname: str) -> str:
    """`override_dirname` with every character a shell or Hydra's override grammar treats specially (`=`, `,`,
    `/`, quotes, spaces, brackets, ...) turned into `_`, so that `run.dir=<path>` takes the printed path as it is.
    When that changed anything, or the name is too long for a file system, a hash of the original keeps two
    different commands in different directories."""
    if not override_dirname:
        return "default"
    name = _UNSAFE.sub("_", override_dirname).strip("_")
    if name != override_dirname or len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 9]}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:8]}"
    return name


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
# hydra.sweep.dir's name for the sweep, from the sweep's own override_dirname (value lists included). Cached, and
# OmegaConf caches by the argument's text: Hydra copies the sweep's cache into every job's config, where the same
# text then gives the sweep's name, not the job's.
OmegaConf.register_new_resolver("sweep_name", readable_name, replace=True, use_cache=True)


def finished_step(run: RunConfig, tag: str | None) -> int | None:
    """The step of the resume point when the run already reached trainer.max_steps, else None (every rank agrees
    on the tag: `resume_point` is collective), before DeepSpeed is even imported, so that a finished run ends at
    once."""
    if tag is None:
        return None
    step = read_meta(Path(run.checkpoint.dir).resolve() / tag)["step"]
    return step if step >= run.trainer.max_steps else None


def make_trainer(cfg: DictConfig, run_dir: str | Path):
    """Validate the composed config (before any process-group work), then build the trainer; None when the run
    has already reached trainer.max_steps."""
    try:
        container = scrub(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        raise TrainConfigError(omegaconf_message(e, "config")) from None
    run = checked_run_config(cfg)
    from ..checkpoint.resume import repair_interrupted_saves, resume_point  # file work only, before DeepSpeed

    main_rank = int(os.environ.get("RANK", "0")) == 0
    # A restart by torchrun (--max-restarts) continues what this launch began, also under resume=false.
    if main_rank and not run.checkpoint.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        aside = set_aside(Path(run_dir), Path(run.checkpoint.dir))
        if aside is not None:
            say(f"timemoe-train: checkpoint.resume=false: the previous checkpoints and metrics moved to "
                f"{aside.resolve()}")
    if main_rank:
        for line in repair_interrupted_saves(Path(run.checkpoint.dir).resolve()):
            say(f"timemoe-train: {line}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from ..parallel import init_process_group

        init_process_group()
        dist.barrier()  # rank 0 has set aside or repaired before any rank looks at the directory
    tag = resume_point(run.checkpoint)  # verified once, by every rank a share, before any engine start-up
    done = finished_step(run, tag)
    if done is not None:
        if main_rank:
            where = Path(run.checkpoint.dir).resolve() / tag
            say(f"timemoe-train: already at step {done} of trainer.max_steps={run.trainer.max_steps} ({where}): "
                f"nothing to train; raise trainer.max_steps to continue, or export it: timemoe-export {where} "
                f"{Path(run_dir).resolve() / 'export'}")
        return None
    from .trainer import Trainer  # torch.distributed, DeepSpeed and megatron load only for a valid config

    return Trainer(run, run_dir, OmegaConf.to_yaml(OmegaConf.create(container)), container, tag)


def train(cfg: DictConfig, run_dir: str | Path) -> bool:
    """One run; True when a stop signal ended it (after saving). Whatever happens, the process-wide state it set
    up is torn down, so that the next job of a multirun can start."""
    lock = RunLock(Path(run_dir)) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        trainer = make_trainer(cfg, run_dir)
        if trainer is None:  # already finished: only finished_step's process group to tear down
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            return False
        finished = False
        try:
            trainer.fit()
            finished = True
        finally:
            trainer.close(finished)  # a barrier only after a run every rank finished
    finally:
        if lock is not None:
            lock.release()
    return trainer.stopped


def _submitit_distributed_env() -> None:
    """Under hydra-submitit-launcher (+cluster=slurm) every task of a job runs this app itself, without torchrun:
    torch.distributed's env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) come from submitit's view of it."""
    if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    _submitit_distributed_env()
    # The directory Hydra gave this job: run.dir itself for one run; hydra.sweep.dir/<run.name> for a job of a
    # multirun, where checkpoints (${run.dir}/checkpoints) must follow the job's .hydra/, metrics and W&B files.
    cfg.run.dir = HydraConfig.get().runtime.output_dir
    try:
        stopped = train(cfg, cfg.run.dir)
    except USER_ERRORS as e:
        discard_created()
        _user_error(f"{type(e).__name__}: {e}")
    except CheckpointWriteError as e:
        _user_error(f"{type(e).__name__}: {e}", WRITE_FAILED)
    if stopped:  # also the end of a multirun: the signal asked this process to stop
        sys.exit(0)


def _user_error(message: str, status: int = 2) -> None:
    """One line, exit `status` (2; 3 for a failed checkpoint write). Every rank meets the same error (the config,
    the corpus and the checkpoints are the same for all; a failed write is agreed on by all), so a launch says it
    once: under `timemoe-train --nproc-per-node` the line goes to torchrun's error file instead (its documented
    JSON), and the launcher prints it once for all ranks. Plain torchrun prints what every rank prints: each node's
    local rank 0 prints it, and the others wait, so that torchrun, seeing local rank 0 fail, stops them unsaid
    (exiting at once, they could make torchrun stop local rank 0 before it printed). An error local rank 0 did not
    meet is still said, by the rank that met it, when the wait is over."""
    line = f"timemoe-train: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED) and error_file:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    else:
        if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0":
            for sig in (signal.SIGTERM, signal.SIGINT):  # not the trainer's stop request: just end
                signal.signal(sig, signal.SIG_DFL)
            time.sleep(_SAY_ONCE_WAIT_S)
        print(line, file=sys.stderr, flush=True)
    sys.exit(status)


# Notices from the libraries about their own internals, printed once per process; nothing a user can act on.
_LIBRARY_NOTICES = (
    # megatron-core without Apex/TE falls back to torch's norm and kernels (and we use DeepSpeed's optimizer anyway)
    r"(Transformer Engine and )?Apex (is|are) not installed",
    r"full scope is deprecated",  # megatron-core's TransformerConfig default for CUDA graphs, which we do not use
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # deepspeed's ZeRO gathers
)
# Loggers whose INFO records (Hydra sets the root logger to INFO) narrate the libraries' own set-up: megatron-core's
# FSDP modules announcing themselves on import, DeepSpeed's op builder echoing its compiler probes.
_LIBRARY_LOGGERS = ("megatron.core.distributed.fsdp", "compilers")


def _stop_with_launcher() -> None:
    """Under torchrun: a SIGTERM (a stop request: save, then exit) when the agent dies, however it dies (kill -9
    included); without it the workers train on as orphans, writing the run directory nobody watches."""
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    def of(package):
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"timemoe-train {of('timemoe-train')} (torch {of('torch')}, deepspeed {of('deepspeed')}, megatron-core "
            f"{of('megatron-core')}, hydra-core {of('hydra-core')})")


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # ours, not Hydra's (which names Hydra only)
        print(version())
        return
    if sys.argv[1:2] and sys.argv[1].split("=")[0] in LAUNCH_OPTIONS:  # timemoe-train --nproc-per-node N ...
        from ..launch import main as launch

        sys.exit(launch(sys.argv[1:]))
    _stop_with_launcher()
    for message in _LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if int(os.environ.get("RANK", "0")) != 0:  # one copy of Hydra's own files, written by rank 0
        sys.argv.append("hydra.output_subdir=null")
    # Hydra then raises its errors (a bad override, an unknown config group) instead of printing them over
    # several lines with exit status 1: they are user errors like the others.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(_app)()
    except Refused as refused:  # found by the preflight check, before Hydra wrote anything
        _user_error(f"{type(refused.error).__name__}: {refused.error}")
    except (HydraException, OmegaConfBaseException) as e:
        _user_error(_hydra_message(e))


def _hydra_message(e: BaseException) -> str:
    """Hydra's error in one line; for a key the config does not have (`trainer.max_step=10`), the keys it has
    that come closest instead of Hydra's `+key=...` (which adds a key the group's dataclass then refuses)."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
    unknown = isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in struct" in str(cause)
    if unknown and isinstance(cause.parent_node, DictConfig):
        return no_such_key(cause.full_key, cause.parent_node.keys())
    return one_line(e) + (f" ({one_line(cause)})" if cause else "")


if __name__ == "__main__":
    main()
