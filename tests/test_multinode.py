"""Two "nodes" on one machine: two network namespaces joined by a veth pair, one `launch/run.py` per namespace, a
c10d rendezvous across them: first a gloo all-reduce, then the trainer with its experts split over the two nodes
(EP=2), whose losses must equal the same run on one node. Traffic stays inside the namespaces made here; they are
deleted afterwards. Needs root and `ip` (iproute2); skips with the reason otherwise."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "dist"))
from train_launch import TINY, metrics, worker_env  # noqa: E402

JOB = """
import json, os, socket
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)
gathered = [None] * world
dist.all_gather_object(gathered, os.environ["LOCAL_ADDR"])
with open(os.path.join(os.environ["JOB_OUT"], f"rank{rank}.json"), "w") as f:
    json.dump({"world": world, "sum": x.item(), "addrs": gathered, "group_rank": os.environ["GROUP_RANK"]}, f)
dist.destroy_process_group()
"""


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    tag = f"{os.getpid() % 100000}"
    names, veths = [f"tmoe{tag}a", f"tmoe{tag}b"], [f"tmva{tag}", f"tmvb{tag}"]
    addrs = ["10.231.7.1", "10.231.7.2"]
    try:
        for ns in names:
            out = ip("netns", "add", ns, check=False)
            if out.returncode:
                pytest.skip(f"cannot create a network namespace: {out.stderr.strip()}")
        ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for ns, veth, addr in zip(names, veths, addrs):
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield list(zip(names, veths, addrs))
    finally:
        for ns in names:  # deleting a namespace removes its end of the veth pair, and so the pair
            ip("netns", "del", ns, check=False)


def run_on_two_nodes(namespaces, cwd: Path, launcher_args: list[str], extra_env: dict, port: int) -> None:
    """One launch/run.py per namespace, rendezvous at node 0's address; fails with the output of a failed node."""
    master = namespaces[0][2]
    procs = []
    for rank, (ns, veth, addr) in enumerate(namespaces):
        env = {**worker_env(), **extra_env, "NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "1",
               "MASTER_ADDR": master, "MASTER_PORT": str(port), "RDZV_ID": f"netns-{port}", "LOCAL_ADDR": addr,
               "GLOO_SOCKET_IFNAME": veth}
        for k in [k for k in env if k.startswith("SLURM_")]:
            del env[k]
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(REPO / "launch" / "run.py"), *launcher_args],
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


@pytest.mark.slow
def test_gloo_all_reduce_across_two_namespaces(two_namespaces, tmp_path):
    (tmp_path / "multinode_job.py").write_text(JOB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run_on_two_nodes(two_namespaces, tmp_path, ["--module", "multinode_job"],
                     {"PYTHONPATH": str(tmp_path), "JOB_OUT": str(out_dir)}, port=29477)
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["world"] == 2 and r["sum"] == 3.0
        # One process in each namespace (the rendezvous, not the node rank, orders them).
        assert r["addrs"] == results[0]["addrs"] and sorted(r["addrs"]) == ["10.231.7.1", "10.231.7.2"]
    assert sorted(r["group_rank"] for r in results) == ["0", "1"]


@pytest.mark.slow
def test_expert_parallel_training_across_two_namespaces_equals_one_node(two_namespaces, tmp_path):
    overrides = [*TINY, "parallel=expert", "parallel.expert_parallel_size=2", "trainer.max_steps=4",
                 "checkpoint.save_at_end=false", "checkpoint.interval=1000"]

    def run_args(run_dir: Path) -> list[str]:
        return ["--", *overrides, f"hydra.run.dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}"]

    one_node = tmp_path / "one_node"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "run.py"), "--nnodes", "1", "--nproc-per-node",
                           "2", *run_args(one_node)], env=worker_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_nodes = tmp_path / "two_nodes"
    run_on_two_nodes(two_namespaces, REPO, run_args(two_nodes), {}, port=29478)

    want, got = metrics(one_node), metrics(two_nodes)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], abs=1e-6)
