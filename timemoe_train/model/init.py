"""The released models' initialisation, tensor by tensor, so that any rank can draw exactly the tensors it owns.

Each tensor comes from its own generator, seeded by (seed, released name): the starting weights are the same
whatever the layout (EP=1, 2, 4 …) and whichever rank draws them, and no rank draws a tensor it does not hold.
"""

from __future__ import annotations

import hashlib

import torch

from .config import TimeMoeConfig


def init_tensor_(t: torch.Tensor, name: str, config: TimeMoeConfig, generator: torch.Generator | None = None):
    """Initialise `t`, the parameter named `name`, in place: RMSNorm weights 1, biases 0, the embedding
    N(0, embed_init_std) when set, everything else N(0, initializer_range)."""
    if name.endswith("norm.weight"):
        return t.fill_(1.0)
    if name.endswith("bias"):
        return t.zero_()
    embed = ".embed_layer." in f".{name}" and config.embed_init_std is not None
    return t.normal_(0.0, config.embed_init_std if embed else config.initializer_range, generator=generator)


def name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def draw_released(config: TimeMoeConfig, seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Fresh fp32 tensors under their released names (`shapes`: name -> shape), each from its own generator."""
    return {name: init_tensor_(torch.empty(shape), name, config, torch.Generator().manual_seed(name_seed(seed, name)))
            for name, shape in shapes.items()}
