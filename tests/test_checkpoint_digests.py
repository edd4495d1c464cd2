"""Checkpoint integrity in one process: files hashed as they are written (torch.save and plain bytes), the manifest,
and `resolve_checkpoint` falling back past a missing, truncated or altered file with a warning naming it; when no
checkpoint verifies, one error naming every bad file; what a save killed midway leaves, repaired before resolving."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

from timemoe_train.checkpoint import MANIFEST, CheckpointCorrupt, CheckpointError, DigestWriter, verify
from timemoe_train.checkpoint.digests import write_manifest
from timemoe_train.checkpoint.resume import CheckpointWarning, repair_interrupted_saves, resolve_checkpoint


def write_checkpoint(root, step: int):
    """A checkpoint directory as a save leaves it: torch files and text through DigestWriter, a file written past
    it (as DeepSpeed copies its recovery script), a sub-directory, then the manifest."""
    tag_dir = root / f"step{step:08d}"
    (tag_dir / "elastic").mkdir(parents=True)
    records = {}
    with DigestWriter(tag_dir / "model.pt", records) as f:
        torch.save({"w": torch.arange(1000.0) * step}, f)
    with DigestWriter(tag_dir / "elastic" / "__0_0.distcp", records) as f:
        f.write(os.urandom(3000))
    (tag_dir / "script.py").write_text("print('recovery')\n")
    write_manifest(tag_dir, records)
    return tag_dir


def test_digests_are_those_of_the_bytes_on_disk_and_torch_files_still_load(tmp_path):
    tag_dir = write_checkpoint(tmp_path, 1)
    files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["elastic/__0_0.distcp", "model.pt", "script.py"]
    for name, entry in files.items():
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.equal(torch.load(tag_dir / "model.pt", weights_only=True)["w"], torch.arange(1000.0))
    verify(tag_dir)


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: os.truncate(p, p.stat().st_size - 1), "bytes, the manifest says"),
    (flip, "sha256 differs"),
])
@pytest.mark.parametrize("name", ["model.pt", "elastic/__0_0.distcp", "script.py"])
def test_newest_damaged_falls_back_to_the_previous_with_a_warning_naming_the_file(tmp_path, damage, why, name):
    write_checkpoint(tmp_path, 4)
    newest = write_checkpoint(tmp_path, 12)
    damage(newest / name)
    with pytest.raises(CheckpointCorrupt, match=why) as err:
        verify(newest)
    assert err.value.path == newest / name
    with pytest.warns(CheckpointWarning) as warned:
        assert resolve_checkpoint(tmp_path) == "step00000004"
    assert len(warned) == 1 and f"checkpoint {newest} is not used: {newest / name}: " in str(warned[0].message)


def test_no_checkpoint_verifies_is_one_error_naming_every_file(tmp_path):
    flip(write_checkpoint(tmp_path, 4) / "model.pt")
    (write_checkpoint(tmp_path, 8) / MANIFEST).unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no checkpoint in .* verifies") as err:
        resolve_checkpoint(tmp_path)
    assert str(tmp_path / "step00000004" / "model.pt") in str(err.value)
    assert str(tmp_path / "step00000008" / MANIFEST) in str(err.value)


def test_no_checkpoint_yet_is_a_fresh_start(tmp_path):
    assert resolve_checkpoint(tmp_path / "nothing") is None
    (tmp_path / ".tmp-step00000004").mkdir()  # an interrupted save is not a checkpoint
    assert resolve_checkpoint(tmp_path) is None


def test_resume_and_export_follow_latest_then_the_lineage_in_write_order_not_step_order(tmp_path):
    """After falling back past a damaged step 12 to step 4, the run saved step 8: `latest` and the lineage say 8,
    although 12 has the higher step. Resume and timemoe-export take the same one, with one function."""
    from timemoe_train.export.cli import checkpoint_dir

    for step in (4, 12, 8):
        write_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step00000008")
    (tmp_path / "lineage").write_text("step00000004\nstep00000008\n")
    assert resolve_checkpoint(tmp_path) == "step00000008"
    assert checkpoint_dir(tmp_path) == (tmp_path, tmp_path / "step00000008")
    flip(tmp_path / "step00000008" / "model.pt")
    with pytest.warns(CheckpointWarning, match="step00000008"):
        assert resolve_checkpoint(tmp_path) == "step00000004"  # the lineage's previous, not the newer-step 12
    with pytest.warns(CheckpointWarning):
        assert checkpoint_dir(tmp_path) == (tmp_path, tmp_path / "step00000004")


def test_a_checkpoint_skipped_as_damaged_leaves_the_lineage_and_never_counts_against_keep_last(tmp_path):
    """A run resumes past a damaged step 12 to step 8: 12 leaves the lineage (its directory stays where it was,
    named in the warning) and `latest` names 8. The next save, with keep_last=2, prunes step 4, not the good step 8
    (before, the damaged 12 counted as one of the two kept); the next start no longer looks at 12."""
    from timemoe_train.checkpoint.resume import resume_point
    from timemoe_train.train.checkpointer import Checkpointer

    for step in (4, 8, 12):
        write_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step00000012")
    (tmp_path / "lineage").write_text("step00000004\nstep00000008\nstep00000012\n")
    flip(tmp_path / "step00000012" / "model.pt")
    config = SimpleNamespace(dir=str(tmp_path))
    with pytest.warns(CheckpointWarning) as warned:
        assert resume_point(config) == "step00000008"
    assert str(warned[-1].message) == (
        f"{tmp_path}: step00000012 left the lineage (resuming from step00000008, which `latest` now names); the "
        f"damaged directories stay, never resumed from nor pruned: remove them when done with them "
        f"({tmp_path / 'step00000012'})")
    assert (tmp_path / "lineage").read_text().split() == ["step00000004", "step00000008"]
    assert (tmp_path / "latest").read_text() == "step00000008"

    (write_checkpoint(tmp_path, 10)).rename(tmp_path / ".tmp-step00000010")  # the resumed run's next save
    Checkpointer._publish(SimpleNamespace(root=tmp_path, cfg=SimpleNamespace(keep_last=2)),
                          tmp_path / ".tmp-step00000010", "step00000010")
    assert (tmp_path / "lineage").read_text().split() == ["step00000008", "step00000010"]
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000008", "step00000010", "step00000012"]
    with warnings.catch_warnings(record=True) as again:
        assert resume_point(config) == "step00000010"
    assert not again


def _verify_as_rank(rank: int, world: int, init_file: str, tag_dirs, out) -> None:
    """One rank of a gloo group: verify `tag_dirs[rank]` (each rank's own view of the checkpoint) together, noting
    the files this rank hashed and the verdict. A collective some rank skipped times out instead of hanging."""
    import torch.distributed as dist

    from timemoe_train.checkpoint import digests

    tag_dir = tag_dirs[rank]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    hashed, digest = [], digests.file_digest
    digests.file_digest = lambda path: (hashed.append(path.relative_to(tag_dir).as_posix()), digest(path))[1]
    try:
        verify(tag_dir, dist.group.WORLD)
        verdict = "ok"
    except CheckpointCorrupt as e:
        verdict = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps({"verdict": verdict, "hashed": hashed}))
    dist.destroy_process_group()


def verify_in_two_processes(tmp_path, tag_dir, rank1_sees=None) -> list[dict]:
    """`rank1_sees`: the directory rank 1 verifies instead of `tag_dir` (what a stale cache shows it)."""
    import torch.multiprocessing as mp

    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    mp.spawn(_verify_as_rank, args=(2, str(out / "store"), [tag_dir, rank1_sees or tag_dir], out), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_hash_a_share_each_and_agree_on_the_verdict(tmp_path):
    tag_dir = write_checkpoint(tmp_path, 4)
    files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    good = verify_in_two_processes(tmp_path, tag_dir)
    assert [r["verdict"] for r in good] == ["ok", "ok"]
    shares = [set(r["hashed"]) for r in good]
    assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(files)
    flipped = sorted(shares[1])[0]  # a file only rank 1 hashes: rank 0 learns of it from the verdict
    flip(tag_dir / flipped)
    bad = verify_in_two_processes(tmp_path, tag_dir)
    assert bad[0]["verdict"] == bad[1]["verdict"]
    assert bad[0]["verdict"].startswith(f"{tag_dir / flipped}: sha256 differs")


@pytest.mark.slow
@pytest.mark.parametrize("rank1_sees", ["a shorter file", "no manifest"])
def test_ranks_that_see_different_files_agree_on_the_verdict_instead_of_hanging(tmp_path, rank1_sees):
    """Rank 1's view of the checkpoint (a stale network file system cache) has one file shorter, or no manifest
    at all: it must not raise before the verdicts are gathered, or rank 0 waits in that collective forever."""
    tag_dir = write_checkpoint(tmp_path, 4)
    stale = tmp_path / "stale" / tag_dir.name
    shutil.copytree(tag_dir, stale)
    if rank1_sees == "a shorter file":
        os.truncate(stale / "model.pt", 10)
        size = (tag_dir / "model.pt").stat().st_size
        want = f"model.pt: 10 bytes, the manifest says {size} (truncated or overwritten)"
    else:
        (stale / MANIFEST).unlink()
        want = f"{MANIFEST}: missing: the checkpoint cannot be verified"
    verdicts = [r["verdict"] for r in verify_in_two_processes(tmp_path, tag_dir, rank1_sees=stale)]
    assert verdicts[0] == f"{tag_dir}/{want}" and verdicts[1] == f"{stale}/{want}", verdicts


def torn(tag_dir):
    (tag_dir / MANIFEST).unlink()  # killed before rank 0 wrote the manifest


@pytest.mark.parametrize("new_copy, kept", [(None, "old"), (torn, "old"), (lambda tag_dir: None, "new")])
def test_a_re_save_killed_midway_leaves_the_old_or_the_new_copy_whole(tmp_path, new_copy, kept):
    """A re-save of step 8 sets the old copy aside as `.old-step00000008` until the new one is in place; killed
    before the new copy arrived (none), or with it torn, the old one goes back; once the new one is whole, the old
    one goes. Left-over `.tmp-` directories go too. Then resume picks step 8 (latest)."""
    write_checkpoint(tmp_path, 4)
    old = write_checkpoint(tmp_path, 8)
    (tmp_path / "latest").write_text("step00000008")
    (tmp_path / "lineage").write_text("step00000004\nstep00000008\n")
    old.rename(tmp_path / ".old-step00000008")
    shutil.copytree(tmp_path / "step00000004", tmp_path / ".tmp-step00000012")
    if new_copy is not None:
        new_copy(write_checkpoint(tmp_path, 8))
    want = (tmp_path / (".old-step00000008" if kept == "old" else "step00000008") / "model.pt").read_bytes()

    said = repair_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "lineage", "step00000004", "step00000008"]
    assert (tmp_path / "step00000008" / "model.pt").read_bytes() == want
    why = {None: "its new copy never arrived",
           torn: f"its new copy is torn ({old / MANIFEST}: missing: the checkpoint cannot be verified)"}.get(new_copy)
    assert said == ([f"{old}: put back the copy a re-save of this step had set aside, as {why}"] if why else [])
    assert resolve_checkpoint(tmp_path) == "step00000008"
