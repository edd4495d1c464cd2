"""Validation during training: a held-out prepared corpus scored every `trainer.val_interval` steps, the best
score's checkpoint kept, and early stopping after `trainer.patience` validations without a new best.

The score is the forecast loss (the mean of the horizon heads' losses, without the MoE balance term) over the
validation corpus's first `trainer.val_batches` micro-batches per rank, read once at start-up as stride windows in
a fixed order: every validation scores the very same windows, so scores are comparable across steps and resumes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist


class Validator:
    def __init__(self, data_cfg, trainer_cfg, dp_rank: int, dp_size: int):
        from ..data import build_train_loader

        # Stride windows over the whole corpus, its own proportions: the same rows however training samples.
        cfg = dataclasses.replace(data_cfg, path=trainer_cfg.val_path, window_mode="stride", stride=None,
                                  holdout_points=0, mixture_weights=None, num_workers=0)
        micro = trainer_cfg.micro_batch_size
        batches = iter(build_train_loader(cfg, dp_rank, dp_size, micro * dp_size, micro))
        self.batches = [next(batches) for _ in range(trainer_cfg.val_batches)]
        batches.close()
        self.patience = trainer_cfg.patience
        self.best, self.best_step, self.since_best = math.inf, None, 0

    @torch.no_grad()
    def score(self, engine, model_inputs, device) -> float:
        """The mean forecast loss over every rank's validation batches (all ranks call this together)."""
        engine.eval()
        try:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for batch in self.batches:
                out = engine(**model_inputs({k: v.to(device) for k, v in batch.items()}))
                total += out.head_losses.double().mean()
        finally:
            engine.train()
        if dist.is_initialized():
            dist.all_reduce(total)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return (total / (len(self.batches) * world)).item()

    def update(self, step: int, loss: float) -> bool:
        """Record `loss` at `step`; True when it is a new best."""
        if loss < self.best:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Early stopping: `patience` validations in a row without a new best."""
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]
