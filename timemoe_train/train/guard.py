"""Non-finite steps: detected on every rank, skipped by all of them, stopped when they keep coming."""

from __future__ import annotations

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    pass


class NonFiniteGuard:
    """Watches each parameter's gradient as backward produces it (before any reduction, so every ZeRO stage and
    precision looks the same): `grads_nonfinite` is 1 once a NaN/Inf appeared since `reset()`. Watches each
    micro-batch's points too (`watch_batch`), keeping the first non-finite one on the device.

    A sum is non-finite exactly when an element is (barring fp32 overflow of the sum itself, which would make the
    norm and the update non-finite anyway)."""

    def __init__(self, module: nn.Module, max_bad_steps: int, device, micro_batches: int):
        self.max_bad_steps = max_bad_steps
        self.grads_nonfinite = torch.zeros((), device=device)
        # Per micro-batch of the step: the flat index (row * (T + 1) + point) of its first non-finite point, or -1.
        self.first_bad_M = torch.full((micro_batches,), -1, dtype=torch.long, device=device)
        self.row_points = 0
        self.consecutive = 0
        self.skipped_total = 0
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._watch)

    def _watch(self, grad: torch.Tensor):
        self.grads_nonfinite.logical_or_(~torch.isfinite(grad.sum(dtype=torch.float32)))

    def watch_batch(self, micro: int, inputs_BT: torch.Tensor, labels_BT: torch.Tensor) -> None:
        """Device work only: the step's existing reduction carries the flag (`nonfinite`), and `bad_points` reads
        the detail when it is set."""
        points_BW = torch.cat([inputs_BT, labels_BT[:, -1:]], dim=1)  # labels are the inputs shifted by one
        bad_N = ~torch.isfinite(points_BW).flatten()
        self.row_points = points_BW.shape[1]
        self.first_bad_M[micro] = torch.where(bad_N.any(), torch.argmax(bad_N.to(torch.uint8)), -1)

    @property
    def nonfinite(self) -> torch.Tensor:
        """1 when a gradient or a point of this step's data was NaN/Inf (a device tensor, for the reduction)."""
        return self.grads_nonfinite.logical_or(self.first_bad_M.ge(0).any()).float()

    def bad_points(self) -> list[tuple[int, int, int]]:
        """(micro-batch, row, point in the row of max_length + 1 points) of each micro-batch's first non-finite
        point (reads the device: call it only for a step the reduction found non-finite)."""
        return [(m, idx // self.row_points, idx % self.row_points)
                for m, idx in enumerate(self.first_bad_M.tolist()) if idx >= 0]

    def reset(self) -> None:
        self.grads_nonfinite.zero_()
        self.first_bad_M.fill_(-1)

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
