#!/usr/bin/env python3
"""Wheels for a GPU node without internet: what a CUDA PyTorch image lacks, plus this project with its configs.

On a machine that reaches PyPI (any Python, any OS that pip runs on):
    python launch/wheelhouse.py build [--python 3.12] [--platform manylinux_2_28_x86_64] [--out wheelhouse]
On the node, with the image's own interpreter (the wheelhouse carries a copy of this script):
    python3 wheelhouse/wheelhouse.py install --venv DIR
then `DIR/bin/timemoe-train ...`, `DIR/bin/timemoe-prep ...`. Without a node (a dry run), an interpreter like its:
    .venv/bin/python wheelhouse/wheelhouse.py stand-in --venv IMAGE

`build` resolves the project for the target Python and platform, wheels only (DeepSpeed and antlr4's runtime,
published as source distributions alone, are built first into pure-Python wheels, DeepSpeed's with its ops off:
they JIT-build on first use). It
downloads every package the project needs except those the image brings (`--image-brings`) and those only they
need, and writes into `image-brings.txt` the brought packages the shipped wheels require, each with the versions
they require of it (a brought package nothing requires, such as transformers, which only `--backend remote`
imports, is no condition of the install).
It also ships pytest, which bench/gpu_check.sh installs from it where the image has none.

`install` checks those first (one line per problem, exit 2), then makes a venv layered over the interpreter's own
packages (a `.pth` file adds its site directories behind the venv's: the image's torch stays, nothing is
downloaded) and installs the project from the wheelhouse with `--no-index` into the venv, with its console scripts,
even where the interpreter already has a timemoe-train of its own. A plain `venv --system-site-packages` would not
do: when the image's python3 is itself a venv, that flag reaches the base interpreter, not the image's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BRINGS_FILE = "image-brings.txt"
# What a vendor CUDA PyTorch image (NGC, this project's GPU node) has installed: its torch is a CUDA build pip
# cannot replace offline; the others are large compiled wheels such images carry anyway.
IMAGE_BRINGS = ("torch", "numpy", "pyarrow", "pandas", "scipy", "safetensors", "transformers", "matplotlib")
# Published as source distributions only (antlr4's 4.9.3 is the one hydra-core 1.3 accepts).
SOURCE_ONLY = ("deepspeed==0.19.8", "antlr4-python3-runtime==4.9.3")
# Shipped beside the project, not installed with it: what bench/gpu_check.sh needs and an image may lack (it runs
# the tests marked `cuda`), installed from the wheelhouse only where the interpreter has none.
CHECK_NEEDS = ("pytest>=8",)


def _packaging():
    """`packaging` where installed (the builder's venv, CUDA images), else the copy inside pip."""
    try:
        from packaging import markers, requirements, specifiers, utils
    except ImportError:  # a bare interpreter: pip is there, it is how the wheels get installed
        from pip._vendor.packaging import markers, requirements, specifiers, utils
    return markers, requirements, specifiers, utils


# --- build ------------------------------------------------------------------------------------------------------

MANYLINUX = re.compile(r"manylinux_2_(\d+)_(\w+)")


def platform_tags(platform: str) -> list[str]:
    """pip's --platform matches one tag exactly: manylinux_2_28_x86_64 means every manylinux tag up to glibc 2.28."""
    m = MANYLINUX.fullmatch(platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{arch}")
    return tags


def target_options(python: str, platform: str) -> list[str]:
    version = python.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", f"cp{version}"]
    for tag in platform_tags(platform):
        options += ["--platform", tag]
    return options


def marker_environment(python: str, platform: str) -> dict:
    m = MANYLINUX.fullmatch(platform)
    arch = m.group(2) if m else platform.split("_", 1)[-1]  # linux_x86_64, linux_aarch64
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "implementation_version": f"{python}.0", "platform_python_implementation": "CPython",
            "os_name": "posix", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch}


def shipped(report: list[dict], brings: set[str], env: dict) -> tuple[list[dict], dict[str, str]]:
    """The resolved packages reachable from the requested ones without passing through one the image brings, and
    for each brought one they require, the versions they require of it (a pip report's `install` list)."""
    markers, requirements, specifiers, utils = _packaging()
    by_name = {utils.canonicalize_name(item["metadata"]["name"]): item for item in report}
    needs: dict[str, specifiers.SpecifierSet] = {}
    seen, todo = set(), [(name, tuple(item.get("requested_extras") or ())) for name, item in by_name.items()
                         if item["requested"]]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in by_name[name]["metadata"].get("requires_dist", []):
            req = requirements.Requirement(line)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (*extras, "")):
                continue
            dep = utils.canonicalize_name(req.name)
            if dep in brings:
                needs[dep] = needs.get(dep, specifiers.SpecifierSet()) & req.specifier
            elif dep not in by_name:
                raise SystemExit(f"wheelhouse: {name} needs {req}, which pip's resolution left out")
            else:
                todo.append((dep, tuple(sorted(req.extras))))
    names = {name for name, _ in seen}
    return [by_name[n] for n in sorted(names)], {n: str(needs[n]) for n in sorted(needs)}


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def build(args: argparse.Namespace) -> int:
    repo = Path(__file__).resolve().parents[1]
    out = Path(args.out).resolve()
    cache = Path(args.cache).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # a wheelhouse holds one version of each package
        old.unlink()
    canonical = _packaging()[3].canonicalize_name
    brings = {canonical(name.strip()) for name in args.image_brings.split(",") if name.strip()}
    target = target_options(args.python, args.platform)
    constraints = ["--constraint", str(Path(args.constraint).resolve())] if args.constraint else []

    for requirement in SOURCE_ONLY:  # pure Python: built once into the cache, whatever the target
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        if not any(cache.glob(pattern)):
            print(f"wheelhouse: building {requirement} into a wheel (published as a source distribution only)")
            pip("wheel", "-q", "--no-deps", "--no-binary", name, requirement, "-w", str(cache),
                env={**os.environ, "DS_BUILD_OPS": "0"})  # DeepSpeed's ops off: they JIT-build on first use
        shutil.copy2(next(cache.glob(pattern)), out)
    # setuptools builds in the checkout's build/, whose leftovers (a module since removed) would enter the wheel.
    shutil.rmtree(repo / "build", ignore_errors=True)
    pip("wheel", "-q", "--no-deps", str(repo), "-w", str(out))
    shutil.rmtree(repo / "build", ignore_errors=True)
    project = next(out.glob("timemoe_train-*.whl"))

    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        # pip takes --platform only with --target, which also makes it ignore what this interpreter has installed.
        pip("install", "-q", "--dry-run", "--target", str(Path(tmp) / "target"), "--report", str(report_path), *target,
            *constraints, "--find-links", str(out), "--cache-dir", str(cache / "pip"), str(project), *CHECK_NEEDS)
        report = json.loads(report_path.read_text())["install"]
    ships, needs = shipped(report, brings, marker_environment(args.python, args.platform))
    downloads = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in ships
                 if not item["download_info"]["url"].startswith(out.as_uri())]  # the wheels built above are there
    pip("download", "-q", "--no-deps", *target, "--cache-dir", str(cache / "pip"), "-d", str(out), *downloads)

    (out / BRINGS_FILE).write_text(
        f"# What this wheelhouse (Python {args.python}, {args.platform}) assumes the interpreter already has:\n"
        "# `wheelhouse.py install` checks these first. The versions are what the shipped wheels require.\n"
        + "".join(f"{name}{spec}\n" for name, spec in needs.items()))
    shutil.copy2(Path(__file__), out / "wheelhouse.py")
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"wheelhouse: {len(wheels)} wheels, {total / 2**20:.1f} MiB (goal: 60) in {out} (Python {args.python}, "
          f"{args.platform}); assumed on the node: {', '.join(f'{n}{s}' for n, s in needs.items())}")
    return 0


# --- install ----------------------------------------------------------------------------------------------------

def missing_from_image(lines: list[str]) -> list[str]:
    """One message per requirement of image-brings.txt that this interpreter does not meet."""
    from importlib.metadata import PackageNotFoundError, version

    _, requirements, _, _ = _packaging()
    problems = []
    for line in lines:
        req = requirements.Requirement(line)
        try:
            found = version(req.name)
        except PackageNotFoundError:
            problems.append(f"{req.name}: not installed (the wheelhouse assumes the image brings {req})")
            continue
        if not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req.name}: {found} is installed, the wheelhouse needs {req}")
    return problems


def install(args: argparse.Namespace) -> int:
    wheelhouse = Path(args.wheelhouse).resolve()
    brings = wheelhouse / BRINGS_FILE
    if not brings.is_file():
        print(f"wheelhouse.py: {brings}: not found (run `wheelhouse.py build` first)", file=sys.stderr)
        return 2
    lines = [ln.split("#")[0].strip() for ln in brings.read_text().splitlines()]
    problems = missing_from_image([ln for ln in lines if ln])
    for problem in problems:
        print(f"wheelhouse.py: {sys.executable}: {problem}", file=sys.stderr)
    if problems:
        return 2
    venv = Path(args.venv).resolve()
    python = venv / "bin" / "python"
    if not python.exists():
        # No pip of its own (ensurepip may be absent from an image): the image's pip runs through the layer below.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    # Every site directory this interpreter reads (its venv's, the system's or Debian's dist-packages, the user's);
    # addsitedir, not a bare path, so that their own .pth files (editable installs, ...) still apply.
    own_site = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    Path(venv_site, "_image_site_packages.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in own_site))
    # --no-compile: byte-compiling every installed file costs a minute of a short GPU lease; imports compile what
    # they use.
    offline = [str(python), "-m", "pip", "install", "-q", "--isolated", "--no-index", "--no-compile", "--find-links",
               str(wheelhouse)]
    # The project itself first, into the venv whatever the layer below holds: a timemoe-train there (an older
    # install, an editable checkout) would satisfy pip, which would then install nothing, console scripts included.
    # The venv's own copy is replaced; the image's is left alone (pip would uninstall it on --force-reinstall).
    own = any(Path(venv_site).glob("timemoe_train-*.dist-info"))
    subprocess.run([*offline, "--no-deps", "--force-reinstall" if own else "--ignore-installed", "timemoe-train"],
                   check=True)
    subprocess.run([*offline, "timemoe-train"], check=True)  # what it needs that the image lacks
    scripts = sorted(p.name for p in (venv / "bin").glob("timemoe-*"))
    if "timemoe-train" not in scripts:
        print(f"wheelhouse.py: {venv / 'bin'}: pip installed no timemoe-train command", file=sys.stderr)
        return 1
    print(f"wheelhouse.py: installed timemoe-train into {venv} (over {sys.executable}'s packages): "
          f"{', '.join(scripts)} in {venv / 'bin'}")
    return 0


# --- stand-in ---------------------------------------------------------------------------------------------------

def stand_in(args: argparse.Namespace) -> int:
    """A venv standing in for the node's interpreter where there is no node (bench/gpu_check.sh --cpu-dry-run, the
    tests): links to this interpreter's copies of what image-brings.txt and --also name, of what those require, and
    of pip; nothing else, so an install over it brings everything the wheelhouse says it brings."""
    from importlib import metadata

    _, requirements, _, utils = _packaging()
    brings = Path(args.wheelhouse).resolve() / BRINGS_FILE
    lines = [ln.split("#")[0].strip() for ln in brings.read_text().splitlines()]
    also = [name.strip() for name in args.also.split(",") if name.strip()]
    found, todo = {}, [requirements.Requirement(ln) for ln in [*lines, *also, "pip"] if ln]
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse.py: {sys.executable} has no {req.name}, which a stand-in needs ({req})")
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"wheelhouse.py: {sys.executable} has {req.name} {dist.version}, a stand-in needs {req}")
        key = utils.canonicalize_name(dist.metadata["Name"])
        if key not in found:
            found[key] = dist
            todo += [r for r in map(requirements.Requirement, dist.requires or [])
                     if not r.marker or r.marker.evaluate({"extra": ""})]
    venv = Path(args.venv).resolve()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in found.values():
        for top in {f.parts[0] for f in dist.files or () if f.parts[0] != ".."}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    print(f"wheelhouse.py: {venv}: {len(found)} packages of {sys.executable} ({', '.join(sorted(found))})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and build the wheels (needs PyPI)")
    b.add_argument("--python", default="3.12", help="target Python version (default 3.12)")
    b.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="target platform; manylinux_2_N_x86_64 takes every manylinux wheel up to glibc 2.N")
    b.add_argument("--out", default="wheelhouse")
    b.add_argument("--cache", default=".cache/wheelhouse", help="DeepSpeed's built wheel and pip's cache")
    b.add_argument("--constraint", metavar="FILE",
                   help="versions the node has (its `python3 -m pip freeze`): the shipped wheels are chosen to fit them")
    b.add_argument("--image-brings", default=",".join(IMAGE_BRINGS),
                   help="comma-separated packages the node's interpreter has (default: %(default)s)")
    i = sub.add_parser("install", help="install from the wheelhouse into a venv over this interpreter (offline)")
    i.add_argument("--venv", required=True, help="the venv to create or update")
    i.add_argument("--wheelhouse", default=str(Path(__file__).resolve().parent),
                   help="default: this script's directory")
    d = sub.add_parser("stand-in", help="a venv holding only what the wheelhouse assumes the node has, linked from "
                                        "this interpreter (for a dry run without the node)")
    d.add_argument("--venv", required=True, help="the venv to create")
    d.add_argument("--wheelhouse", default=str(Path(__file__).resolve().parent),
                   help="default: this script's directory")
    d.add_argument("--also", default="", help="comma-separated packages the node has though nothing shipped requires "
                                              "them (e.g. transformers, which the GPU check's export test loads)")
    args = p.parse_args(argv)
    return {"build": build, "install": install, "stand-in": stand_in}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
