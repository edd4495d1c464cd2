"""What a launch checks before Hydra writes anything: Hydra makes the run directory, its `.hydra/` and the log file
before the app runs, so a launch refused afterwards would leave them behind (and `.hydra/` overwritten by a command
that never ran). A Hydra callback (`hydra.callbacks` in train.yaml) runs first: it validates the config and the
run directory, and remembers which directories the launch is about to create, so that a user error met later (in
the corpus, say) can remove them again (`discard_created`). A multirun's jobs are composed by the sweeper, after
Hydra's own checks and after it made each job's directory: a job refused by the app removes its directory when
this launch made it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from ..checkpoint import CheckpointError
from ..model.config import ConfigError
from .config import TrainConfigError, checked_run_config
from .run_dir import NotARunDir, check_run_dir

# Directories this launch creates (the run directory and its missing parents, innermost first); only rank 0, the
# one process that writes the run directory's contents, removes them.
_created: list[Path] = []


class Refused(BaseException):
    """The user error the preflight check met (`error`). Not an Exception: Hydra turns a callback's Exception into a
    warning and runs the app all the same."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # the run's name, ${run_name:}, reads it
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(run_dir)  # as Hydra is about to: ${hydra:runtime.output_dir}
        HydraConfig.instance().set_config(config)
        try:
            run = checked_run_config(config)
            check_run_dir(run_dir, Path(run.checkpoint.dir).absolute())
        except (TrainConfigError, ConfigError, NotARunDir, CheckpointError) as e:
            raise Refused(e) from None
        _created.clear()
        if int(os.environ.get("RANK", "0")) == 0:
            missing = run_dir
            while not missing.exists():
                _created.append(missing)
                missing = missing.parent


    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """A multirun's job, whose directory Hydra has made by now: it counts as made by this launch while it
        holds nothing but Hydra's files and the log (a job that trained before has its checkpoints there)."""
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        _created.clear()
        job_dir = Path(str(config.hydra.runtime.output_dir))
        if int(os.environ.get("RANK", "0")) == 0 and all(
                p.name == ".hydra" or p.suffix == ".log" for p in job_dir.iterdir()):
            _created.append(job_dir)


def discard_created() -> None:
    """After a user error: remove what this launch created: the run directory it made (Hydra's files, the lock,
    the log) and the parents it made, as long as nothing else has appeared in them."""
    if _created:
        shutil.rmtree(_created[0], ignore_errors=True)
        for parent in _created[1:]:
            try:
                parent.rmdir()
            except OSError:  # not empty: another run's directory is there now
                break
    _created.clear()
