"""Patches that let megatron-core's MoE layer run where it was not written to run.

Tested with megatron-core 0.16.1 and torch 2.13.0 (+cpu build), gloo, 1–4 processes. Nothing is patched at
import: `timemoe_train.parallel.init_parallel` calls `apply()` when it sets up megatron's groups and
`destroy_parallel` calls `undo()`, which puts every name back. `apply()` is idempotent and touches only the names
listed here; re-check them when either version changes.

Applied everywhere (`apply()` always runs this part):
- `moe_utils.te_general_gemm = None` when it is missing. megatron-core 0.16.1 defines that name only inside its
  TransformerEngine import block, yet the router's gating GEMM tests `te_general_gemm is not None`, so without TE
  the first router call raises NameError — on GPU installs without TE too.

Applied only when CUDA is absent (the layer code calls CUDA APIs unconditionally):
- `torch.cuda.current_device()` answers "cpu": megatron places buffers and the router weight with
  `device=torch.cuda.current_device()`.
- `torch.cuda.Stream`, `Event`, `current_stream`, `stream` become no-ops: the alltoall dispatcher creates a side
  stream in `__init__` and copies its split sizes "device to host" on it; on CPU there is nothing to overlap.
- The tensor-parallel RNG tracker runs on the CPU generator: megatron's tracker saves, seeds and restores the CUDA
  generator (`tensor_parallel.checkpoint`, forked dropout); with no CUDA generator those calls fail. Its warning
  that the CPU generator moved inside a fork is silenced: on CPU that is the forked generator.
- The alltoall dispatcher's `maybe_move_tensor_to_cpu` also turns *CPU* split tensors into numpy: megatron only
  converts CUDA tensors, and gloo's `all_to_all_single` then receives tensors where it expects split-size lists.
"""

from __future__ import annotations

import contextlib
import logging

import torch

_originals: dict[tuple[object, str], object] = {}  # (owner, name) -> the value before apply()
_MISSING = object()


class _NoStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NoStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _cpu_rng_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """megatron's CudaRNGStatesTracker, seeding and forking the CPU generator instead."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    return CpuRNGStatesTracker


def _move_splits_to_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            return tensor.numpy()
    return tensor


def _set(owner, name: str, value) -> None:
    _originals.setdefault((owner, name), getattr(owner, name, _MISSING))
    setattr(owner, name, value)


def _cpu_rng_filter(record) -> bool:
    # The tracker warns when the CPU generator moves inside a fork; here the forked generator *is* the CPU one.
    return "CPU RNG state changed" not in record.getMessage()


def _apply_cpu_patches() -> None:
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    _set(torch.cuda, "current_device", lambda: "cpu")
    _set(torch.cuda, "Stream", _NoStream)
    _set(torch.cuda, "Event", _NoStream)
    _set(torch.cuda, "current_stream", lambda device=None: _NoStream())
    _set(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())

    _set(mrandom, "_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    _set(mrandom, "_set_cuda_rng_state",
         lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    _set(mrandom, "CudaRNGStatesTracker", _cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker))
    mrandom.initialize_rng_tracker(force_reset=True)
    logging.getLogger(mrandom.__name__).addFilter(_cpu_rng_filter)

    _set(moe_utils, "maybe_move_tensor_to_cpu", _move_splits_to_numpy)
    _set(token_dispatcher, "maybe_move_tensor_to_cpu", _move_splits_to_numpy)


def apply() -> None:
    """Make megatron-core's MoE layer runnable in this process (idempotent), until `undo()`."""
    if _originals:
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        _set(moe_utils, "te_general_gemm", None)
    if not torch.cuda.is_available():
        _apply_cpu_patches()


def undo() -> None:
    """Put back every name `apply()` replaced (idempotent)."""
    if not _originals:
        return
    from megatron.core.tensor_parallel import random as mrandom

    for (owner, name), value in _originals.items():
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    tracker_patched = (mrandom, "CudaRNGStatesTracker") in _originals
    _originals.clear()
    if tracker_patched:
        mrandom.initialize_rng_tracker(force_reset=True)
        logging.getLogger(mrandom.__name__).removeFilter(_cpu_rng_filter)
