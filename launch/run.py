#!/usr/bin/env python3
"""torchrun for one node of a run: the rendezvous comes from the environment, Hydra overrides go to the trainer.

    python launch/run.py [--dry-run] [-- ] data.path=/data/shards trainer.max_steps=1000 ...

Where each setting comes from (first found wins):
  nodes          --nnodes,         NNODES,         SLURM_JOB_NUM_NODES / SLURM_NNODES,  1
  this node      --node-rank,      NODE_RANK,      SLURM_NODEID,                        0
  procs / node   --nproc-per-node, NPROC_PER_NODE, SLURM_GPUS_ON_NODE,  visible GPUs or 1
  rendezvous     --master-addr,    MASTER_ADDR,    first host of SLURM_JOB_NODELIST     (required for > 1 node)
                 --master-port,    MASTER_PORT,    29500
  run id         --rdzv-id,        RDZV_ID,        SLURM_JOB_ID,                        timemoe
One node and no MASTER_ADDR: `--standalone` (torchrun picks a free port). Otherwise a c10d rendezvous at
MASTER_ADDR:MASTER_PORT.

Stopping: torchrun forwards SIGTERM, SIGINT and (added here) SIGUSR1 to every trainer process, which saves the
current step and exits 0; it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torchrun's default: 30; raise it when a
checkpoint save takes longer) before it kills them. torchrun then re-raises the signal as an exception (a
traceback, status 1); this launcher reports it in one line and exits 0, like the trainer.

Nodes that share a hostname which resolves elsewhere (network namespaces, some containers) also need:
  LOCAL_ADDR=<this node's address>  -> --local_addr, and --rdzv_conf is_host=1 on node 0, is_host=0 elsewhere
  RDZV_IS_HOST=0|1                  -> overrides that is_host choice
  GLOO_SOCKET_IFNAME=<interface>    read by gloo itself; shown in the dry run
  RDZV_CONF=key=value,...           extra --rdzv_conf entries (e.g. join_timeout=900)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys

DEFAULT_PORT = 29500
# torchrun's default set plus SLURM's warning signal, all forwarded to the trainer processes.
STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
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
           "--signals_to_handle", STOP_SIGNALS]
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", type=int)
    p.add_argument("--node-rank", type=int)
    p.add_argument("--nproc-per-node", type=int)
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("--rdzv-id")
    p.add_argument("--module", default="timemoe_train.train", help="module each process runs (default: trainer)")
    p.add_argument("--dry-run", action="store_true", help="print this node's command instead of running it")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for the trainer")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.overrides[:1] == ["--"]:
        args.overrides = args.overrides[1:]
    try:
        cmd = torchrun_command(args, dict(os.environ))
    except LaunchError as e:
        print(f"launch/run.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        shown = [f"{k}={shlex.quote(os.environ[k])}" for k in SHOWN_ENV if os.environ.get(k)]
        print(" ".join(shown + [shlex.quote(c) for c in cmd]), flush=True)
        return 0
    return run_torchrun(cmd[3:])


def run_torchrun(torchrun_args: list[str]) -> int:
    """torchrun in this process (the command above is `python -m torch.distributed.run` + these arguments)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_args)
    except Exception as e:
        stop = stop_signal(e, SignalException)
        if stop is None:
            raise
        print(f"launch/run.py: {signal.Signals(stop.sigval).name}: torchrun forwarded it to the trainer processes, "
              "which save their current step and exit", file=sys.stderr, flush=True)
    return 0


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
