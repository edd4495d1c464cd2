"""Two "nodes" on one machine: two network namespaces joined by a veth pair, one `launch/run.py` per namespace, a
gloo all-reduce across them through a c10d rendezvous. Traffic stays inside the namespaces made here; they are
deleted afterwards. Needs root and `ip` (iproute2); skips with the reason otherwise."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_gloo_all_reduce_across_two_namespaces(two_namespaces, tmp_path):
    (tmp_path / "multinode_job.py").write_text(JOB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    master = two_namespaces[0][2]
    procs = []
    for rank, (ns, veth, addr) in enumerate(two_namespaces):
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "JOB_OUT": str(out_dir), "NNODES": "2",
               "NODE_RANK": str(rank), "NPROC_PER_NODE": "1", "MASTER_ADDR": master, "MASTER_PORT": "29477",
               "RDZV_ID": "netns-test", "LOCAL_ADDR": addr, "GLOO_SOCKET_IFNAME": veth, "OMP_NUM_THREADS": "1"}
        for k in [k for k in env if k.startswith("SLURM_")]:
            del env[k]
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(REPO / "launch" / "run.py"), "--module",
             "multinode_job"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["world"] == 2 and r["sum"] == 3.0
        # One process in each namespace (the rendezvous, not the node rank, orders them).
        assert r["addrs"] == results[0]["addrs"] and sorted(r["addrs"]) == ["10.231.7.1", "10.231.7.2"]
    assert sorted(r["group_rank"] for r in results) == ["0", "1"]
