"""torchrun for one node of a run, run in this process through torch's own `torch.distributed.run`: the rendezvous
comes from the environment, Hydra overrides go to the trainer.

    timemoe-train --nproc-per-node 2 [--dry-run] [--] data.path=/data/shards trainer.max_steps=1000 ...
    timemoe-train --nproc-per-node 2 -m optim.lr=1e-3,2e-3 data.path=...    (a Hydra sweep, each job on 2 processes)
    python launch/run.py ...   (the same, from a checkout)

The launcher's options come first; the first argument that is not one of them (an override, or a Hydra flag such as
-m/--multirun or --cfg) and everything after it go to every trainer process. `--` may mark the boundary.

Where each setting comes from (first found wins):
  nodes          --nnodes,         NNODES,         SLURM_JOB_NUM_NODES / SLURM_NNODES,  1
  this node      --node-rank,      NODE_RANK,      SLURM_NODEID,                        0
  procs / node   --nproc-per-node, NPROC_PER_NODE, SLURM_GPUS_ON_NODE,  visible GPUs or 1
  rendezvous     --master-addr,    MASTER_ADDR,    first host of SLURM_JOB_NODELIST     (required for > 1 node)
                 --master-port,    MASTER_PORT,    29500
  run id         --rdzv-id,        RDZV_ID,        SLURM_JOB_ID,                        timemoe
One node and no MASTER_ADDR: `--standalone` (torchrun picks a free port). Otherwise a c10d rendezvous at
MASTER_ADDR:MASTER_PORT.

Stopping: SIGTERM, SIGUSR1 (SLURM's warning) and SIGINT (Ctrl-C) are passed on to every trainer process as a stop
request: each saves its current step and exits 0, and so does this launcher. Repeated more than a second later,
SIGINT is passed on too (the trainers exit at once, unsaved; one line, status 130, as one process); SIGTERM or
SIGUSR1 hand over to torchrun,
which sends the trainers SIGTERM, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) and kills them. SIGHUP
and SIGQUIT go to torchrun, which stops the trainers unsaved (exit 128 + the signal). If this launcher dies (even
kill -9), every trainer gets SIGTERM from the kernel (its parent-death signal) and saves its step as well.
Exit status: 0 finished or stopped and saved; 2 a user error, 3 a checkpoint that could not be written, each printed
once; otherwise the trainers' failure.

Nodes that share a hostname which resolves elsewhere (network namespaces, some containers) also need:
  LOCAL_ADDR=<this node's address>  -> --local_addr, and --rdzv_conf is_host=1 on node 0, is_host=0 elsewhere
  RDZV_IS_HOST=0|1                  -> overrides that is_host choice
  GLOO_SOCKET_IFNAME=<interface>    read by gloo itself; shown in the dry run
  RDZV_CONF=key=value,...           extra --rdzv_conf entries (e.g. join_timeout=900)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

DEFAULT_PORT = 29500
# torchrun's own handler keeps these of its default set; the trainer's stop signals (data.loader.STOP_SIGNALS) this
# launcher passes on as a stop request.
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"
# Set for the trainer processes: a user error goes to torchrun's error file, and this launcher prints it once.
LAUNCHED = "TIMEMOE_TRAIN_LAUNCHER"
# The commands whose processes it launches (the trainer, and `timemoe-eval gift-eval --nproc-per-node`) begin a user
# error's line with their name.
USER_ERROR_PREFIXES = ("timemoe-train:", "timemoe-eval:")
# Variables the spawned processes read directly; the dry run shows the ones that are set.
SHOWN_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES")


class LaunchError(ValueError):
    pass


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if not m:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host from it")
    prefix, ranges, suffix = m.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def setting(cli_value, env: dict, names: tuple[str, ...], default=None):
    if cli_value is not None:
        return cli_value
    return next((env[n] for n in names if env.get(n)), default)


def as_int(value, what: str) -> int:
    try:
        return int(str(value).split("(")[0])  # SLURM writes counts like "8(x2)"
    except ValueError:
        raise LaunchError(f"{what}={value!r}: not an integer") from None


def torchrun_command(args: argparse.Namespace, env: dict) -> list[str]:
    nnodes = as_int(setting(args.nnodes, env, ("NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), 1), "nnodes")
    node_rank = as_int(setting(args.node_rank, env, ("NODE_RANK", "SLURM_NODEID"), 0), "node rank")
    nproc = as_int(setting(args.nproc_per_node, env, ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE"), None)
                   or max(visible_gpus(), 1), "nproc per node")
    master = setting(args.master_addr, env, ("MASTER_ADDR",))
    if master is None and env.get("SLURM_JOB_NODELIST"):
        master = first_host(env["SLURM_JOB_NODELIST"])
    port = as_int(setting(args.master_port, env, ("MASTER_PORT",), DEFAULT_PORT), "master port")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} is outside 0..{nnodes - 1} (nnodes={nnodes})")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--signals_to_handle", TORCHRUN_SIGNALS]
    if nnodes == 1 and master is None:
        cmd.append("--standalone")
    else:
        if master is None:
            raise LaunchError(f"{nnodes} nodes need a rendezvous host: set MASTER_ADDR (or run under SLURM)")
        rdzv_id = setting(args.rdzv_id, env, ("RDZV_ID", "SLURM_JOB_ID"), "timemoe")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{master}:{port}", "--rdzv_id", str(rdzv_id)]
        rdzv_conf = [c for c in env.get("RDZV_CONF", "").split(",") if c]
        if env.get("LOCAL_ADDR"):
            cmd += ["--local_addr", env["LOCAL_ADDR"]]
            rdzv_conf.insert(0, f"is_host={env.get('RDZV_IS_HOST', '1' if node_rank == 0 else '0')}")
        elif env.get("RDZV_IS_HOST"):
            rdzv_conf.insert(0, f"is_host={env['RDZV_IS_HOST']}")
        if rdzv_conf:
            cmd += ["--rdzv_conf", ",".join(rdzv_conf)]
    return cmd + ["-m", args.module] + args.overrides


# Options that make `timemoe-train` this launcher when they come first; all but the flags take a value.
LAUNCH_FLAGS = ("--dry-run", "-h", "--help")
LAUNCH_OPTIONS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-id",
                  "--module", "--dry-run")


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this launcher's options, the trainers' arguments): the options lead, and the first argument that is not one
    of them starts the trainers' (Hydra's own flags, -m included, are not this launcher's business)."""
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in LAUNCH_OPTIONS + LAUNCH_FLAGS:
        i += 1 if argv[i] in LAUNCH_FLAGS or "=" in argv[i] else 2
    rest = argv[i:]
    return argv[:i], rest[1:] if rest[:1] == ["--"] else rest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timemoe-train", description=__doc__, allow_abbrev=False,
                                usage="timemoe-train --nproc-per-node N [launcher options] [--] [-m] [key=value ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", type=int)
    p.add_argument("--node-rank", type=int)
    p.add_argument("--nproc-per-node", type=int)
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("--rdzv-id")
    p.add_argument("--module", default="timemoe_train.train", help="module each process runs (default: trainer)")
    p.add_argument("--dry-run", action="store_true", help="print this node's command instead of running it")
    return p


def main(argv: list[str] | None = None) -> int:
    options, trainer_args = split_arguments(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(options)
    args.overrides = trainer_args
    try:
        cmd = torchrun_command(args, dict(os.environ))
    except LaunchError as e:
        print(f"timemoe-train: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        shown = [f"{k}={shlex.quote(os.environ[k])}" for k in SHOWN_ENV if os.environ.get(k)]
        print(" ".join(shown + [shlex.quote(c) for c in cmd]), flush=True)
        return 0
    return run_torchrun(cmd[3:])


def run_torchrun(torchrun_args: list[str], program: str = "timemoe-train") -> int:
    """torchrun in this process (the command above is `python -m torch.distributed.run` + these arguments), with
    the stop signals passed on to the trainers; the exit status says how they ended. `program`: the command whose
    one-line user errors (`write_error_file`) its processes report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # The signals the trainers take as a stop request; imported here, not at the top: --help and --dry-run stay
    # free of torch.
    from .data.loader import STOP_SIGNALS

    os.environ[LAUNCHED] = "1"
    if not os.environ.get("LOGLEVEL"):  # torchrun's variable; otherwise the agent narrates every failure it reports
        # (the errors module sets its own level on import: it would still log that torchrun has no error file of
        # its own to copy a process's one-line error into)
        for name in ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.errors"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    forward = StopForwarder(SignalException)
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        torchrun_main(torchrun_args)
    except ChildFailedError as e:
        failures = list(e.failures.values())
        codes = {f.exitcode for f in failures}
        if forward.interrupted_twice and all(c == 128 + signal.SIGINT or c < 0 for c in codes):
            # The second Ctrl-C: each node's first trainer said so in one line, as one process does.
            return 128 + signal.SIGINT
        # A user error (2) or a failed checkpoint write (3): some rank exited so with its line in torchrun's error
        # file, and the others did the same or were stopped by torchrun's SIGTERM on the way.
        messages = [m for m in (f.message.get("message", "") if isinstance(f.message, dict) else f.message
                                for f in failures) if m.startswith(USER_ERROR_PREFIXES + (f"{program}:",))]
        said = codes & {2, 3}
        if not messages or len(said) != 1 or not all(c in said or c < 0 for c in codes):
            raise
        for message in dict.fromkeys(messages):  # every rank finds the same error: said once
            print(message, file=sys.stderr, flush=True)
        return said.pop()
    except Exception as e:
        stop = stop_signal(e, SignalException)
        if stop is None:
            raise
        print(f"{program}: {signal.Signals(stop.sigval).name}: torchrun stopped the trainer processes without "
              "waiting for a save", file=sys.stderr, flush=True)
        return 128 + stop.sigval
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def write_error_file(line: str) -> bool:
    """A process's one-line user error under this launcher: into torchrun's error file (its documented JSON), which
    `run_torchrun` prints once for all processes. False when not under this launcher: the process says it itself."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(LAUNCHED) and error_file):
        return False
    with open(error_file, "w") as f:
        json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    return True


class StopForwarder:
    """The launcher's handler for the trainers' stop signals: the first (and a repeat within a second, as when SLURM signals
    every process) is passed on to the trainer processes, this launcher's children, and torchrun keeps waiting for
    them to save and exit; a later SIGINT too (the trainers' "second Ctrl-C"); a later SIGTERM/SIGUSR1 is raised
    in torchrun as its own handler would, and torchrun stops the trainers."""

    def __init__(self, signal_exception: type):
        self.signal_exception = signal_exception
        self.first: float | None = None
        self.interrupted_twice = False

    def __call__(self, signum, frame):
        now = time.monotonic()
        later = self.first is not None and now - self.first > 1.0
        if later and signum != signal.SIGINT:
            raise self.signal_exception(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
        self.interrupted_twice = self.interrupted_twice or later
        trainers = children()
        for pid in trainers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if self.first is None:
            print(f"timemoe-train: {signal.Signals(signum).name} passed on to {len(trainers)} trainer processes (a "
                  "stop request: each saves its current step and exits)", file=sys.stderr, flush=True)
        self.first = self.first or now


def children() -> list[int]:
    """This process's children (the trainers torchrun started here), from every thread's list."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        found += [int(pid) for pid in (task / "children").read_text().split()]
    return found


def stop_signal(exc: BaseException, signal_exception: type) -> BaseException | None:
    """The SignalException behind `exc`, if any. torchrun raises it from its signal handler wherever the agent is;
    landing inside torch's metrics wrapper before its timer is set, it surfaces as that wrapper's UnboundLocalError
    with the SignalException as context (torch 2.13); the agent has still stopped the workers (with SIGTERM)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, signal_exception):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
