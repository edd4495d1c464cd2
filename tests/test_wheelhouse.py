"""launch/wheelhouse.py: a wheelhouse built for this machine's Python installs with `--no-index` into a fresh venv over
an interpreter that holds only torch, and the installed commands, run from a directory with no checkout, prepare a
corpus and train the tiny model on 2 processes to a saved checkpoint with the configs inside the package. The
install refuses an interpreter without what the wheelhouse assumes; the build ships exactly what the brought
packages do not cover."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from timemoe_train.checkpoint import read_meta

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "wheelhouse.py"
# Downloads and the built DeepSpeed/antlr4 wheels survive between runs (CI reaches PyPI; a re-run reads the cache).
CACHE = REPO / ".cache" / "wheelhouse"

spec = importlib.util.spec_from_file_location("wheelhouse", SCRIPT)
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def clean_env(venv: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LOCAL_RANK", "RANK",
                                                            "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's JIT ops
    return {**env, "DS_BUILD_OPS": "0", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_offline_install_over_torch_only_trains_from_no_checkout(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = tmp_path / "wheelhouse"
    # transformers: brought by the image, required by nothing shipped, so no condition of the install (the
    # torch-only image below lacks it)
    build = run([sys.executable, SCRIPT, "build", "--python", python, "--image-brings", "torch,transformers", "--out",
                 out, "--cache", CACHE], REPO, {**os.environ}, timeout=900)
    summary = build.stdout.strip().splitlines()[-1]
    assert summary.startswith("wheelhouse: ") and "assumed on the node: torch>=" in summary, summary
    assert "transformers" not in (out / wheelhouse.BRINGS_FILE).read_text()
    names = {w.name.split("-")[0].lower() for w in out.glob("*.whl")}
    assert {"timemoe_train", "deepspeed", "megatron_core", "hydra_core", "omegaconf", "antlr4_python3_runtime",
            "wandb", "datasets", "submitit", "hydra_submitit_launcher", "numpy", "pyarrow", "pytest"} <= names
    assert "torch" not in names and "sympy" not in names  # brought, and needed by torch alone
    # The wheelhouse travels alone: its own copy of the installer, its list of what the image must bring.
    moved = shutil.move(out, tmp_path / "elsewhere")
    # An interpreter standing in for a CUDA image's: torch, what torch requires and pip, nothing else.
    run([sys.executable, Path(moved) / "wheelhouse.py", "stand-in", "--venv", tmp_path / "image"], REPO, {**os.environ},
        timeout=120)
    image = tmp_path / "image" / "bin" / "python"
    venv = tmp_path / "venv"
    work = tmp_path / "work"  # no checkout here or above
    work.mkdir()
    env = clean_env(venv)
    run([image, Path(moved) / "wheelhouse.py", "install", "--venv", venv], work, env, timeout=900)

    where = run([venv / "bin" / "python", "-c", "import timemoe_train, torch; print(timemoe_train.__file__); "
                 "print(torch.__file__)"], work, env, timeout=120).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and not Path(where[1]).is_relative_to(venv)  # torch: the image's

    rng = np.random.default_rng(0)
    t = np.arange(4000)
    pd.DataFrame({"date": pd.date_range("2020-01-01", periods=t.size, freq="h").astype(str),
                  **{f"c{i}": np.sin(2 * np.pi * t / 24 + i) + rng.normal(0, 0.1, t.size) for i in range(3)}}
                 ).to_csv(work / "series.csv", index=False)
    run([venv / "bin" / "timemoe-prep", "--source", "csv", "--input", "series.csv", "--output", "prepared",
         "--workers", "1", "--no-progress"], work, env, timeout=300)
    assert (work / "prepared" / "manifest.json").is_file()

    train = run([venv / "bin" / "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 venv / "bin" / "timemoe-train", "model=tiny", "data.path=prepared", "data.max_length=48",
                 "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.max_steps=4",
                 "checkpoint.interval=0", "logger=none", "logger.progress=false", "run.name=offline"],
                work, env, timeout=600)
    assert "timemoe-train: starting a new run" in train.stdout
    (tag,) = (work / "runs" / "offline" / "checkpoints").glob("step*")
    assert read_meta(tag)["step"] == 4
    assert (tag / "elastic" / ".metadata").is_file()

    # A user's own config directory still joins the packaged ones.
    (work / "mine" / "model").mkdir(parents=True)
    (work / "mine" / "model" / "wide.yaml").write_text("defaults:\n  - tiny\n  - _self_\nhidden_size: 48\n")
    job = run([venv / "bin" / "timemoe-train", "--config-dir", "mine", "model=wide", "data=synthetic", "--cfg",
               "job"], work, env, timeout=120).stdout
    assert "hidden_size: 48" in job and "num_experts: 4" in job


def test_install_refuses_an_interpreter_without_what_the_image_must_bring(tmp_path):
    out = tmp_path / "wheelhouse"
    out.mkdir()
    shutil.copy2(SCRIPT, out / "wheelhouse.py")
    (out / wheelhouse.BRINGS_FILE).write_text("# header\ntorch>=99\nno-such-package-here>=1\npip\n")
    proc = subprocess.run([sys.executable, out / "wheelhouse.py", "install", "--venv", tmp_path / "venv"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert f"torch: {metadata.version('torch')} is installed, the wheelhouse needs torch>=99" in lines[0]
    assert "no-such-package-here: not installed (the wheelhouse assumes the image brings no-such-package-here>=1)" \
        in lines[1]
    assert not (tmp_path / "venv").exists()  # nothing made before the check


@pytest.mark.slow
def test_install_over_an_interpreter_that_has_timemoe_train_gives_the_venv_its_own_commands(tmp_path):
    """This interpreter stands in for an image that already has timemoe-train (here: the editable checkout) and
    every dependency: the wheelhouse holds the project's wheel alone. Installed twice (the second an update)."""
    source = tmp_path / "source"  # the wheel is built from a copy: the checkout's build/ is left alone
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, source / name)
    for name in ("configs", "timemoe_train", "data_prep"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheelhouse"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", source, "-w", out],
        tmp_path, {**os.environ}, timeout=600)
    shutil.copy2(SCRIPT, out / "wheelhouse.py")
    (out / wheelhouse.BRINGS_FILE).write_text("torch>=2.10\nnumpy\n")
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    env = clean_env(venv)
    wide = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=40, freq="h").astype(str),
                         "a": np.sin(np.arange(40.0))})
    wide.to_csv(work / "series.csv", index=False)
    for attempt in ("install", "update"):
        installed = run([sys.executable, out / "wheelhouse.py", "install", "--venv", venv], work, env, timeout=600)
        assert (venv / "bin" / "timemoe-train").is_file(), (attempt, installed.stdout, installed.stderr)
        assert "timemoe-eval, timemoe-export, timemoe-finetune, timemoe-forecast, timemoe-prep, timemoe-train in " \
            in installed.stdout, (attempt, installed.stdout)
        where = run([venv / "bin" / "python", "-c", "import timemoe_train; print(timemoe_train.__file__)"], work, env,
                    timeout=120).stdout.strip()
        assert Path(where).is_relative_to(venv), (attempt, where)
        site = Path(where).parents[1]
        assert [p.name for p in site.glob("timemoe_train-*.dist-info")] == [
            f"timemoe_train-{metadata.version('timemoe-train')}.dist-info"]
        run([venv / "bin" / "timemoe-prep", "--source", "csv", "--input", "series.csv", "--output", attempt,
             "--workers", "1", "--no-progress"], work, env, timeout=300)
        assert (work / attempt / "manifest.json").is_file()


def _item(name, version, requires=(), requested=False):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}, "requested": requested,
            "download_info": {"url": f"https://example.invalid/{name}-{version}.whl"}}


def test_shipped_leaves_out_what_only_brought_packages_need():
    report = [
        _item("app", "1", ["torch>=2.10", "Hydra_Core>=1.3", "numpy>=1.26", "winonly; sys_platform == 'win32'",
                           "extra-thing; extra == 'more'"], requested=True),
        _item("torch", "2.14", ["sympy", "filelock"]),
        _item("sympy", "1.0"),
        _item("filelock", "3.0"),
        _item("hydra-core", "1.3.8", ["omegaconf~=2.2", "filelock", "numpy>=1.20"]),
        _item("omegaconf", "2.3"),
        _item("numpy", "2.0"),
        _item("hf-xet", "1.6", []),
    ]
    report[4]["metadata"]["requires_dist"].append('hf-xet>=1.6; platform_machine == "x86_64"')
    env = wheelhouse.marker_environment("3.12", "manylinux_2_28_x86_64")
    ships, needs = wheelhouse.shipped(report, {"torch", "numpy", "transformers"}, env)
    assert [i["metadata"]["name"] for i in ships] == ["app", "filelock", "hf-xet", "hydra-core", "omegaconf"]
    # transformers is brought but required by nothing shipped: the install does not ask for it
    assert needs == {"numpy": str(wheelhouse._packaging()[2].SpecifierSet(">=1.26,>=1.20")), "torch": ">=2.10"}
    assert wheelhouse.platform_tags("manylinux_2_18_x86_64") == [
        "manylinux_2_18_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"] + [
        t for m in range(16, 4, -1) for t in [f"manylinux_2_{m}_x86_64"]
        + ({12: ["manylinux2010_x86_64"], 5: ["manylinux1_x86_64"]}.get(m, []))]
