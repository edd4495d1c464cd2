"""`timemoe-train`: the Hydra app (also `torchrun … -m timemoe_train.train key=value …`).

    torchrun --nproc_per_node 2 -m timemoe_train.train experiment=demo data.path=data/prepared
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..data.errors import DataError
from ..checkpoint import CheckpointError
from ..model.config import ConfigError
from .config import RunConfig, TrainConfigError
from .monitor import scrub

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
USER_ERRORS = (TrainConfigError, ConfigError, DataError, CheckpointError, FileNotFoundError)


def launch_stamp() -> str:
    """`YYYY-MM-DD/HH-MM-SS` of this launch, the same on every local rank: torchrun's agent (our parent) start."""
    if stamp := os.environ.get("TIMEMOE_LAUNCH_STAMP"):
        return stamp
    started = time.time()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(started))


def run_config(cfg: DictConfig) -> RunConfig:
    """Instantiate every group's dataclass (`_target_`), turning bad values into one clear message."""
    groups = {}
    for name in ("model", "data", "parallel", "optim", "trainer", "checkpoint", "logger"):
        try:
            groups[name] = hydra.utils.instantiate(cfg[name], _convert_="all")
        except hydra.errors.InstantiationException as e:
            cause = e.__cause__ or e
            raise TrainConfigError(f"{name}: {cause}") from None
    return RunConfig(**groups)


def make_trainer(cfg: DictConfig, run_dir: str | Path):
    """Validate the composed config (before any process-group work), then build the trainer."""
    run = run_config(cfg)
    run.validate(int(os.environ.get("WORLD_SIZE", "1")))
    container = scrub(OmegaConf.to_container(cfg, resolve=True))
    from .trainer import Trainer  # torch.distributed, DeepSpeed and megatron load only for a valid config

    return Trainer(run, run_dir, OmegaConf.to_yaml(OmegaConf.create(container)), container)


def train(cfg: DictConfig, run_dir: str | Path) -> None:
    trainer = make_trainer(cfg, run_dir)
    trainer.fit()
    trainer.close()  # a barrier: only after a run every rank finished (an error exits without it)


def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        print(f"timemoe-train: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


# Notices from the libraries about their own internals, printed once per process; nothing a user can act on.
_LIBRARY_NOTICES = (
    # megatron-core without Apex/TE falls back to torch's norm and kernels (and we use DeepSpeed's optimizer anyway)
    r"(Transformer Engine and )?Apex (is|are) not installed",
    r"full scope is deprecated",  # megatron-core's TransformerConfig default for CUDA graphs, which we do not use
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # deepspeed's ZeRO gathers
)


def main() -> None:
    for message in _LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    OmegaConf.register_new_resolver("launch_stamp", launch_stamp, use_cache=True, replace=True)
    if int(os.environ.get("RANK", "0")) != 0:  # one copy of Hydra's own files, written by rank 0
        sys.argv.append("hydra.output_subdir=null")
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")(_app)()


if __name__ == "__main__":
    main()
