"""torchrun worker for the checkpoint tests: compose the Hydra config from `configs/` with the given overrides and
train, optionally, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0), the last rank SIGKILLs itself
  --die-in-step N         in step N right after its first backward: one rank lost mid-step, the others left in a
                          collective
  --die-in-write-of N     while the background thread writes the step-N checkpoint (right after one of its files),
                          once the step loop has gone on to step N+1

    torchrun --max-restarts 1 --nproc_per_node 2 tests/dist/checkpoint_run.py --run-dir D [--die-in-step 6] -- k=v ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer


def die_in_step(trainer, step: int) -> None:
    backward = trainer.engine.backward

    def backward_then_die(*args, **kwargs):
        out = backward(*args, **kwargs)
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    trainer.engine.backward = backward_then_die


def die_in_write_of(trainer, step: int) -> None:
    from timemoe_train.checkpoint import DigestWriter, tag_for

    close = DigestWriter.close

    def close_then_die(self):
        close(self)
        if threading.current_thread() is not threading.main_thread() and tag_for(step) in str(self.path):
            while trainer.step <= step:
                time.sleep(0.01)
            print(f"checkpoint_run: killed while writing {self.path.parent.name} at step {trainer.step}",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    DigestWriter.close = close_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--die-in-step", type=int)
    parser.add_argument("--die-in-write-of", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    trainer = make_trainer(cfg, args.run_dir)
    last_rank = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
    if last_rank and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        if args.die_in_step:
            die_in_step(trainer, args.die_in_step)
        if args.die_in_write_of:
            die_in_write_of(trainer, args.die_in_write_of)
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
