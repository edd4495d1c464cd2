"""Non-finite steps: detected on every rank, skipped by all of them, stopped when they keep coming."""

from __future__ import annotations

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    pass


class NonFiniteGuard:
    """Watches each parameter's gradient as backward produces it (before any reduction, so every ZeRO stage and
    precision looks the same): `grads_nonfinite` is 1 once a NaN/Inf appeared since `reset()`.

    A sum is non-finite exactly when an element is (barring fp32 overflow of the sum itself, which would make the
    norm and the update non-finite anyway)."""

    def __init__(self, module: nn.Module, max_bad_steps: int, device):
        self.max_bad_steps = max_bad_steps
        self.grads_nonfinite = torch.zeros((), device=device)
        self.consecutive = 0
        self.skipped_total = 0
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._watch)

    def _watch(self, grad: torch.Tensor):
        self.grads_nonfinite.logical_or_(~torch.isfinite(grad.sum(dtype=torch.float32)))

    def reset(self) -> None:
        self.grads_nonfinite.zero_()

    def record(self, skipped: bool) -> None:
        if skipped:
            self.consecutive += 1
            self.skipped_total += 1
        else:
            self.consecutive = 0

    def check(self, step: int) -> None:
        """Raise once `max_bad_steps` steps in a row were skipped."""
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"step {step}: loss or gradient norm non-finite for {self.consecutive} steps in a row "
                f"(trainer.max_bad_steps={self.max_bad_steps}); the weights are those of the last good step. "
                "Resume from the last checkpoint with a lower optim.lr, stronger optim.clip_grad or "
                "trainer.precision=fp32, or check the data for extreme values")

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.skipped_total = state["consecutive"], state["skipped_total"]
