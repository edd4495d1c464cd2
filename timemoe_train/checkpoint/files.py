"""Reading a checkpoint's pickled files without running code from them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .format import CheckpointError


def _engine_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its own files besides tensors, allowed for weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path: str | Path, root: str | Path, map_location="cpu", engine_classes: bool = True):
    """torch.load restricted to files inside `root` (the run's checkpoint directory), with weights_only=True:
    tensors and containers only, plus (`engine_classes`) DeepSpeed's own bookkeeping classes."""
    path, root = Path(path).resolve(), Path(root).resolve()
    if root not in path.parents:
        raise PermissionError(f"{path}: refusing to unpickle a file outside the checkpoint directory {root}")
    try:
        with torch.serialization.safe_globals(_engine_globals() if engine_classes else []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        raise CheckpointError(f"{path}: refused: it pickles {unsafe}, and only tensors and DeepSpeed's bookkeeping "
                              f"are loaded (weights_only=True): {str(e).splitlines()[0]}") from None
