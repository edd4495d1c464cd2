"""A synthetic corpus for smoke tests and benchmarks: packed windows of seeded random series, no files needed.

Same interface as the Arrow loader (`build_train_loader` yielding micro-batch dicts, `state_dict` for exact
resume). Sample g of the stream depends only on (seed, g), and the global batch of step s is samples
[s·G, (s+1)·G) cut into contiguous per-rank, per-micro-batch blocks, so every data × expert layout sees the same
global batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SyntheticDataConfig:
    max_length: int = 512  # points per row (inputs); each row holds max_length + 1 points
    seed: int = 0
    num_domains: int = 3
    # Pieces per row are drawn between 1 and this; >1 exercises packing (attention and loss stop at boundaries).
    max_pieces: int = 3
    path: str | None = None  # unused; present so `data.path` overrides do not fail on this source

    def build_train_loader(self, dp_rank: int, dp_size: int, global_batch_size: int, micro_batch_size: int):
        return SyntheticLoader(self, dp_rank, dp_size, global_batch_size, micro_batch_size)


def synthetic_row(cfg: SyntheticDataConfig, index: int) -> dict[str, torch.Tensor]:
    """Row `index` of the stream: pieces of domain-flavoured series (sine + random walk), z-scored per piece."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    points = cfg.max_length + 1
    num_pieces = int(torch.randint(1, cfg.max_pieces + 1, (), generator=g))
    cuts = sorted(torch.randint(8, points, (num_pieces - 1,), generator=g).tolist())
    bounds = [0, *cuts, points]
    values_P = torch.zeros(points)
    piece_P = torch.full((points,), -1, dtype=torch.long)
    domain_P = torch.full((points,), -1, dtype=torch.long)
    # The last piece stops short of the row end sometimes, leaving padding.
    end_pad = int(torch.randint(0, max(points // 8, 1), (), generator=g)) if num_pieces > 1 else 0
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        b = b - end_pad if j == num_pieces - 1 else b
        if b - a < 2:
            continue
        domain = int(torch.randint(0, cfg.num_domains, (), generator=g))
        t = torch.arange(b - a, dtype=torch.float32)
        period = 6.0 * (domain + 1) + float(torch.rand((), generator=g)) * 10
        noise = torch.randn(b - a, generator=g) * (0.1 + 0.2 * domain)
        x = torch.sin(2 * math.pi * t / period) + 0.3 * torch.cumsum(noise, 0) + noise
        values_P[a:b] = (x - x.mean()) / x.std().clamp_min(1e-6)
        piece_P[a:b], domain_P[a:b] = j, domain
    same_next = (piece_P[1:] == piece_P[:-1]) & (piece_P[:-1] >= 0)
    return {"inputs": values_P[:-1], "labels": values_P[1:], "loss_mask": same_next.float(),
            "sequence_ids": piece_P[:-1], "domain_ids": domain_P[:-1]}


class SyntheticLoader:
    def __init__(self, cfg: SyntheticDataConfig, dp_rank, dp_size, global_batch_size, micro_batch_size):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.micro_per_step = global_batch_size // (dp_size * micro_batch_size)
        self.next_micro = 0  # micro-batches of this rank handed out so far
        self.domain_names = [f"synthetic{d}" for d in range(cfg.num_domains)]

    def __iter__(self):
        while True:
            step, m = divmod(self.next_micro, self.micro_per_step)
            first = (step * self.global_batch_size + self.dp_rank * (self.global_batch_size // self.dp_size)
                     + m * self.micro_batch_size)
            rows = [synthetic_row(self.cfg, first + i) for i in range(self.micro_batch_size)]
            self.next_micro += 1
            yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        """As the Arrow loader's: the position in global batches, valid under any layout at a batch boundary."""
        global_batch, micro_step = divmod(self.next_micro, self.micro_per_step)
        return {"global_batch": global_batch, "micro_step": micro_step, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["micro_step"] and (state["dp_size"], state["micro_batch_size"]) != (self.dp_size,
                                                                                     self.micro_batch_size):
            raise ValueError(f"synthetic loader state: micro_step={state['micro_step']} was saved inside a global "
                             "batch; resume with the same dp_size and micro_batch_size")
        self.next_micro = state["global_batch"] * self.micro_per_step + state["micro_step"]
