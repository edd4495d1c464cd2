"""Background saves where a step outruns its write (as on a GPU), through the installed `timemoe-train` run from
outside the checkout, with test-only faults in the writer (tests/dist/writer_faults, a sitecustomize):

- every background write lagging training by seconds: each checkpoint holds exactly its step's state (every tensor
  of every file equals the synchronous save's), and resuming from one continues exactly like the uninterrupted run
  (losses, gradient norms, weights), at one process with the defaults (ZeRO-0, the native MoE layer) and at two
  processes EP=2 with ZeRO-1 in bf16;
- one rank's write failing (ENOSPC, which names no file) or hanging: every rank stops with one line naming the rank
  and the file, exit status 3, long before gloo's 30-minute default; `latest` still names the previous checkpoint,
  which verifies.
The host copies themselves (`HostCopies`) also on a GPU: pinned, taken behind queued work, complete at `ready()`."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from train_launch import REPO, metrics, worker_env  # noqa: E402

from timemoe_train.checkpoint import load_checkpoint_file, verify  # noqa: E402
from timemoe_train.train.checkpointer import HostCopies  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FAULTS = REPO / "tests" / "dist" / "writer_faults"
RUN = ["model=tiny", "data=synthetic", "data.max_length=48", "logger=none", "logger.progress=false",
       "logger.heatmap_interval=0", "trainer.max_steps=8", "trainer.global_batch_size=8",
       "trainer.micro_batch_size=4", "checkpoint.interval=2", "checkpoint.keep_last=4"]
EP2_ZERO1 = ["parallel=expert", "parallel.zero_stage=1"]
# DeepSpeed's own files were handed over live: the module's weights and, at ZeRO-0, Adam's moments (the defaults);
# ZeRO's bf16 partitions and their moments (bf16_zero_pp_rank_*) at EP=2.
LAYOUTS = {"one-process-defaults": (1, []), "ep2-zero1-bf16": (2, EP2_ZERO1 + ["trainer.precision=bf16"])}
TAGS = [f"step{s:08d}" for s in (2, 4, 6, 8)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_host_copies_keep_the_values_they_had_when_taken(device):
    """What a save stages: weights that are views of one flat buffer (as under ZeRO), Adam's moments, a loss
    scaler object, and the elastic part's views of them. On a GPU the copies queue behind matrix products, as
    behind a step. After `ready()` the live state changes in place at once; the copies keep the values
    they had, in host memory (pinned, from a GPU), each tensor copied once and the views viewing those copies."""
    flat = torch.randn(1 << 20, device=device)
    moment = torch.randn(4096, device=device)
    live = {"module": {"a": flat[:1000].view(10, 100), "b": flat[1000:3000]},
            "optimizer": {"state": {0: {"exp_avg": moment}}, "scaler": SimpleNamespace(cur_scale=1.0)}}
    want = copy.deepcopy(live)
    if device == "cuda":
        busy = torch.randn(8192, 8192, device=device)
        for _ in range(20):
            busy = busy @ busy / 8192
    copies = HostCopies()
    staged = copies.tree({**live, "again": live["module"]["a"]})
    inside_b, inside_moment = copies.view(flat[1500:2500]), copies.view(moment[100:200])
    copies.ready()
    flat.mul_(-1)
    moment.add_(1)
    live["optimizer"]["scaler"].cur_scale = 2.0
    a, b, exp_avg = staged["module"]["a"], staged["module"]["b"], staged["optimizer"]["state"][0]["exp_avg"]
    expected_pairs = ((a, want["module"]["a"]), (b, want["module"]["b"]), (inside_b, want["module"]["b"][500:1500]),
                      (exp_avg, want["optimizer"]["state"][0]["exp_avg"]))
    for got, expected in expected_pairs:
        assert got.device.type == "cpu" and got.is_pinned() == (device == "cuda")
        assert torch.equal(got, expected.cpu())
    assert staged["optimizer"]["scaler"].cur_scale == 1.0
    assert staged["again"] is a

    def storage(t):
        return t.untyped_storage().data_ptr()

    assert storage(inside_b) == storage(b) and storage(inside_moment) == storage(exp_avg)


def train(nproc: int, run_dir: Path, overrides: list[str], **faults: str) -> subprocess.CompletedProcess:
    launcher = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    env = worker_env(PYTHONPATH=os.pathsep.join([str(FAULTS), *filter(None, [os.environ.get("PYTHONPATH")])]),
                     **faults)
    return subprocess.run([str(BIN / "timemoe-train"), *launcher, *RUN, *overrides, f"run.dir={run_dir}"],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def train_ok(nproc: int, run_dir: Path, overrides: list[str], **faults: str) -> list[dict]:
    proc = train(nproc, run_dir, overrides, **faults)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return metrics(run_dir)


def tensors(obj, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def checkpoint_state(tag_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: DeepSpeed's files, the trainer states, the elastic part (weights, moments).
    NumPy's global generator is left out: nothing seeds it, so it differs between any two processes."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = {}
    for path in sorted(tag_dir.glob("*.pt")):
        state.update((path.name + k, t) for k, t in tensors(load_checkpoint_file(path, tag_dir.parent)))
    dcp_to_torch_save(tag_dir / "elastic", scratch)
    state.update((f"elastic/{k}", t) for k, t in torch.load(scratch, weights_only=True).items())
    return {k: t for k, t in state.items() if "/rng/numpy/" not in k}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoints_written_while_training_goes_on_hold_their_step_and_resume_exactly(layout, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    synchronous = train_ok(nproc, tmp_path / "sync", overrides + ["checkpoint.async_save=false"])
    lagging = train_ok(nproc, tmp_path / "lagging", overrides, TIMEMOE_TEST_WRITE_LAG_S="3")
    assert [(r["loss"], r["grad_norm"]) for r in lagging] == [(r["loss"], r["grad_norm"]) for r in synchronous]
    for tag in TAGS:
        want = checkpoint_state(tmp_path / "sync" / "checkpoints" / tag, tmp_path / "want.pt")
        got = checkpoint_state(tmp_path / "lagging" / "checkpoints" / tag, tmp_path / "got.pt")
        assert sorted(got) == sorted(want), tag
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differ, f"{tag}: {len(differ)} of {len(want)} tensors differ from the synchronous save's, " \
                           f"e.g. {differ[:3]}"
    assert any(not torch.equal(a, b) for a, b in zip(  # the steps between checkpoints changed the state
        checkpoint_state(tmp_path / "sync" / "checkpoints" / TAGS[0], tmp_path / "a.pt").values(),
        checkpoint_state(tmp_path / "sync" / "checkpoints" / TAGS[1], tmp_path / "b.pt").values()))

    resumed = tmp_path / "resumed" / "checkpoints"  # from the lagging run's step 4, as after a kill at step 5
    shutil.copytree(tmp_path / "lagging" / "checkpoints", resumed)
    for tag in TAGS[2:]:
        shutil.rmtree(resumed / tag)
    (resumed / "latest").write_text(TAGS[1])
    (resumed / "lineage").write_text("".join(t + "\n" for t in TAGS[:2]))
    continued = train_ok(nproc, tmp_path / "resumed", overrides)
    assert [r["step"] for r in continued] == [5, 6, 7, 8]
    assert [(r["loss"], r["grad_norm"]) for r in continued] == [(r["loss"], r["grad_norm"]) for r in lagging[4:]]
    final = checkpoint_state(resumed / TAGS[3], tmp_path / "final.pt")
    straight = checkpoint_state(tmp_path / "lagging" / "checkpoints" / TAGS[3], tmp_path / "straight.pt")
    weights = [k for k in straight if k.startswith("elastic/model.")]
    assert weights and all(torch.equal(final[k], straight[k]) for k in weights)


@pytest.mark.parametrize("fault, why", [("fail", "No space left on device (errno 28)"),
                                        ("hang", "still being written after checkpoint.write_timeout_s=15 s")],
                         ids=["fail", "hang"])
def test_one_rank_whose_write_fails_or_hangs_stops_every_rank_with_one_line(fault, why, tmp_path):
    """Rank 1's write of the step-4 checkpoint fails at its first byte, or hangs there; the others wait for it at
    most checkpoint.write_timeout_s (15 s here), and the test's own timeout is far below gloo's 30 minutes."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    proc = train(2, run, EP2_ZERO1 + ["checkpoint.write_timeout_s=15"], TIMEMOE_TEST_WRITE_FAULT=f"1:4:{fault}")
    ours = [line for line in proc.stderr.splitlines() if "timemoe-train" in line]
    assert proc.returncode == 3 and len(ours) == 1, proc.stderr[-6000:]
    prefix = f"timemoe-train: CheckpointWriteError: rank 1 could not write its part of checkpoint step00000004: " \
             f"{ckpt / '.tmp-step00000004'}/"
    assert ours[0].startswith(prefix), ours[0]
    file, rest = ours[0][len(prefix):].split(": ", 1)
    assert file.endswith(".pt") and "/" not in file, file  # one of rank 1's own files of that checkpoint
    assert rest == f"{why}; the checkpoint was not published, {ckpt / 'latest'} still names step00000002"
    assert "Traceback" not in proc.stderr
    assert (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "lineage").read_text().split() == ["step00000002"]
    verify(ckpt / "step00000002")
    assert not (ckpt / "step00000004").exists() and not list(ckpt.glob(".tmp-*"))
    assert metrics(run)[-1]["step"] < 8  # stopped, not trained to the end
