"""DataConfig: everything that decides which points the trainer sees, and how fast they arrive.

Hydra's `configs/data/*.yaml` instantiates it with `_target_: timemoe_train.data.DataConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_MODES = ("stride", "random")
NORMALIZATIONS = ("sequence", "window", "none")
MIXTURE_BY = ("domain", "dataset")


@dataclass
class DataConfig:
    # Directory holding `manifest.json` and the Arrow shards written by `timemoe-prep`.
    path: str = "data/prepared"
    # Points the model sees per row; each window holds max_length + 1 points (inputs = [:-1], labels = [1:]).
    max_length: int = 4096
    # "stride": windows start at 0, stride, 2·stride, … of each sequence; "random": the same number of windows per
    # sequence per epoch, each at a uniformly random offset (a new one every epoch).
    window_mode: str = "stride"
    # None = max_length: consecutive windows share one point, so every (input, next point) pair is trained once.
    stride: int | None = None
    # Pack pieces shorter than a window (short series, tails of long ones) into shared rows; attention, positions
    # and the loss never cross a piece boundary. Off: one piece per row, padded.
    packing: bool = True
    # "window": z-score each piece with its own mean/std, as `forecast()` scales a context at inference, so the
    # model trains on the inputs it will be given; "sequence": with the mean/std of the whole series (the released
    # code: each window then carries a level and scale it cannot see at inference); "none": values as stored.
    normalization: str = "window"
    # "window" only: each piece's last N points are left out of its mean/std (at least half the piece is kept).
    # With N = the longest forecast head (64), a window's inputs carry no trace of the level of the targets past
    # its context, as at inference, where the statistics are those of the context alone. 0: the whole piece.
    normalization_excludes: int = 0
    # The last N points of every sequence are never in a training window (nor in its normalisation statistics):
    # held out for evaluation on data the run never saw. A sequence of fewer than N + 2 points contributes nothing;
    # with "sequence" normalisation the statistics are those of the trained part.
    holdout_points: int = 0
    # Groups the mixture weights refer to: "domain", or "dataset" (named "<domain>/<dataset>" as in the manifest).
    mixture_by: str = "domain"
    # Group name -> weight (the share of rows); groups left out are not sampled. None: proportional to the
    # manifest's point counts.
    mixture_weights: dict[str, float] | None = None
    # Probabilities ∝ weight^(1/temperature): 1 keeps the weights, larger flattens towards uniform.
    mixture_temperature: float = 1.0
    # Rows per mixture block: every block holds each group's share of rows exactly (to 1/block).
    mixture_block: int = 65536
    seed: int = 0
    # Where the sample plan (windows, packing bins, groups, statistics) is cached, built by one process and
    # memory-mapped by every rank and worker. None: `<path>/plans`, or ~/.cache/timemoe-train/plans when the
    # corpus is read-only.
    plan_dir: str | None = None
    # DataLoader worker processes (0: build batches in the training process) and batches each one prefetches.
    num_workers: int = 2
    prefetch_factor: int = 4
    # None: pin host memory when CUDA is available, so host-to-device copies can be asynchronous.
    pin_memory: bool | None = None
    # SHA-256 of every shard against the manifest before training (reads all shards once).
    verify_checksums: bool = False

    def __post_init__(self):
        if self.mixture_weights is not None:  # Hydra hands a DictConfig
            self.mixture_weights = dict(self.mixture_weights)
        self.validate()

    @property
    def window_points(self) -> int:
        return self.max_length + 1

    @property
    def window_stride(self) -> int:
        return self.max_length if self.stride is None else self.stride

    def validate(self) -> None:
        from .errors import DataError

        def bad(field, value, why):
            raise DataError("DataConfig", field, value, why)

        if self.max_length < 1:
            bad("max_length", self.max_length, "must be a positive integer")
        if self.window_mode not in WINDOW_MODES:
            bad("window_mode", self.window_mode, f"choose one of {WINDOW_MODES}")
        if self.stride is not None and self.stride < 1:
            bad("stride", self.stride, "must be a positive integer (or null for max_length)")
        if isinstance(self.holdout_points, bool) or not isinstance(self.holdout_points, int) \
                or self.holdout_points < 0:
            bad("holdout_points", self.holdout_points, "must be an integer >= 0")
        if self.normalization not in NORMALIZATIONS:
            bad("normalization", self.normalization, f"choose one of {NORMALIZATIONS}")
        if isinstance(self.normalization_excludes, bool) or not isinstance(self.normalization_excludes, int) \
                or self.normalization_excludes < 0:
            bad("normalization_excludes", self.normalization_excludes, "must be an integer >= 0")
        if self.normalization_excludes and self.normalization != "window":
            bad("normalization_excludes", self.normalization_excludes,
                f'applies to normalization="window" only, not {self.normalization!r}')
        if self.mixture_by not in MIXTURE_BY:
            bad("mixture_by", self.mixture_by, f"choose one of {MIXTURE_BY}")
        if not self.mixture_temperature > 0:
            bad("mixture_temperature", self.mixture_temperature, "must be > 0")
        if self.mixture_block < 1:
            bad("mixture_block", self.mixture_block, "must be a positive integer")
        for name, w in (self.mixture_weights or {}).items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                bad(f"mixture_weights.{name}", w, "must be a non-negative number")
        if self.mixture_weights is not None and not any(w > 0 for w in self.mixture_weights.values()):
            bad("mixture_weights", self.mixture_weights, "at least one weight must be positive")
        if self.num_workers < 0:
            bad("num_workers", self.num_workers, "must be >= 0")
        if self.prefetch_factor < 1:
            bad("prefetch_factor", self.prefetch_factor, "must be >= 1")
