"""Importing the package changes nothing outside it: megatron-core's CPU patches are applied by `init_parallel`
(only without a GPU) and taken back by `destroy_parallel`, never at import."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, pkgutil, sys
import torch

import types

def cuda_names():  # a submodule imported later (torch.cuda._pin_memory_utils) is no patch
    return {name: value for name in dir(torch.cuda)
            if not isinstance(value := getattr(torch.cuda, name), types.ModuleType)}

before = cuda_names()
import data_prep, timemoe_train
modules = [m.name for pkg in (timemoe_train, data_prep)
           for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in modules:
    importlib.import_module(name)
assert "timemoe_train.model.moe_megatron" in sys.modules and "timemoe_train.train.trainer" in sys.modules
after = cuda_names()
changed = sorted(n for n in before.keys() | after.keys() if before.get(n) is not after.get(n))
assert not changed, f"importing the package changed torch.cuda: {changed}"
assert not torch.cuda.is_initialized()

from megatron.core.transformer.moe import token_dispatcher
from timemoe_train.parallel import destroy_parallel, init_parallel
dispatcher_before = token_dispatcher.maybe_move_tensor_to_cpu
init_parallel()
if not torch.cuda.is_available():  # the patches are there while the layout is
    assert torch.cuda.current_device is not before["current_device"]
    assert token_dispatcher.maybe_move_tensor_to_cpu is not dispatcher_before
destroy_parallel()
changed = sorted(n for n, v in cuda_names().items() if before.get(n) is not v)
assert not changed, f"destroy_parallel left torch.cuda patched: {changed}"
assert token_dispatcher.maybe_move_tensor_to_cpu is dispatcher_before
print(f"{len(modules)} modules imported; torch.cuda untouched")
"""


def test_importing_any_module_leaves_torch_cuda_untouched_and_the_patches_are_scoped():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.cuda untouched" in proc.stdout
