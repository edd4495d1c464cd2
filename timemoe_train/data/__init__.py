"""Prepared shards -> windows -> packed, mixed, rank-sharded, resumable micro-batches."""

from .config import DataConfig
from .errors import DataError
from .loader import TrainLoader, build_train_loader

__all__ = ["DataConfig", "DataError", "TrainLoader", "build_train_loader"]
