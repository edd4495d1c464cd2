"""Checkpoint integrity in one process: files hashed as they are written (torch.save and plain bytes), the manifest,
and `resolve_checkpoint` falling back past a missing, truncated or altered file with a warning naming it; when no
checkpoint verifies, one error naming every bad file."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from timemoe_train.checkpoint import MANIFEST, CheckpointCorrupt, CheckpointError, DigestWriter, verify
from timemoe_train.checkpoint.digests import write_manifest
from timemoe_train.checkpoint.resume import CheckpointWarning, resolve_checkpoint


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


def _verify_as_rank(rank: int, world: int, init_file: str, tag_dir, out) -> None:
    """One rank of a gloo group: verify `tag_dir` together, noting the files this rank hashed and the verdict."""
    import torch.distributed as dist

    from timemoe_train.checkpoint import digests

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hashed, digest = [], digests.file_digest
    digests.file_digest = lambda path: (hashed.append(path.relative_to(tag_dir).as_posix()), digest(path))[1]
    try:
        verify(tag_dir, dist.group.WORLD)
        verdict = "ok"
    except CheckpointCorrupt as e:
        verdict = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps({"verdict": verdict, "hashed": hashed}))
    dist.destroy_process_group()


def verify_in_two_processes(tmp_path, tag_dir) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    mp.spawn(_verify_as_rank, args=(2, str(out / "store"), tag_dir, out), nprocs=2)
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
