"""Where the plan file lives and who builds it: one process per file system, every other one waits, then maps it.

The file is named by the plan's key (a hash of everything the plan depends on, `plan.plan_identity`), so another
corpus or configuration never finds it; its header repeats the key, which catches a renamed or copied file. A
file that is foreign, truncated or (with verify_checksums) damaged is rebuilt where the directory is writable and
refused otherwise, never used. Building holds an exclusive lock on `<file>.lock` (POSIX lockf, which shared file
systems support) and renames the finished file into place; under torch.distributed, rank 0 goes first and the
others wait at a barrier, so a job on a shared file system builds once even where locks are slow.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist

from .config import DataConfig
from .errors import DataError
from .corpus import Manifest
from .plan import Plan, plan_identity, plan_key, plan_parts
from .plan_file import PlanFileError, read_plan_file, write_plan_file

log = logging.getLogger(__name__)


def plan_dirs(manifest: Manifest, cfg: DataConfig) -> list[Path]:
    """Candidate directories in order: the configured one, or beside the corpus then the user's cache."""
    if cfg.plan_dir:
        return [Path(cfg.plan_dir)]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [manifest.path.parent / "plans", cache / "timemoe-train" / "plans"]


def _open(path: Path, key: str, verify: bool) -> tuple[Plan | None, str | None]:
    """(the plan, None), or (None, why the file there cannot be used; None if there is none)."""
    if not path.exists():
        return None, None
    try:
        meta, arrays = read_plan_file(path, key, verify)
    except PlanFileError as e:
        return None, str(e)
    return Plan(key, meta, arrays, path), None


def _build(manifest: Manifest, cfg: DataConfig, path: Path, key: str) -> Plan:
    start = time.perf_counter()
    log.info("building the sample plan of %s (%d shards) into %s", manifest.path.parent, len(manifest.shards), path)
    built_key, meta, arrays = plan_parts(manifest, cfg)
    assert built_key == key
    write_plan_file(path, key, meta, arrays)
    log.info("sample plan built in %.1f s: %s", time.perf_counter() - start, path)
    return Plan(key, *read_plan_file(path, key), path)


def _load_or_build(manifest: Manifest, cfg: DataConfig) -> Plan:
    key = plan_key(plan_identity(manifest, cfg))
    name = f"plan-{key[:32]}.bin"
    dirs = plan_dirs(manifest, cfg)
    problems = []
    for directory in dirs:
        plan, why = _open(directory / name, key, cfg.verify_checksums)
        if plan is not None:
            return plan
        if why:
            log.warning("%s: %s; not using it", directory / name, why)
            problems.append(f"{directory / name}: {why}")
    for directory in dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / f"{name}.lock", "ab")
        except OSError as e:
            problems.append(f"{directory}: not writable ({e.strerror})")
            continue
        with lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            plan, _ = _open(directory / name, key, cfg.verify_checksums)  # built while this process waited
            if plan is not None:
                return plan
            for stale in directory.glob(f"{name}.tmp*"):  # left by a builder that was killed: we hold the lock
                stale.unlink(missing_ok=True)
            return _build(manifest, cfg, directory / name, key)
    raise DataError(dirs[0], "plan_dir", str(dirs[0]), "no usable sample plan and nowhere to build one: "
                    + "; ".join(problems))


def load_plan(manifest: Manifest, cfg: DataConfig) -> Plan:
    """This corpus and config's plan, mapped from its cache file (built first if needed)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        dist.barrier()  # rank 0 builds first
    try:
        return _load_or_build(manifest, cfg)
    finally:  # also when rank 0 failed: the others then meet the same error themselves instead of hanging
        if distributed and dist.get_rank() == 0:
            dist.barrier()
