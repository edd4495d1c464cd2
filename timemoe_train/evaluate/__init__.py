"""HF-layout checkpoints -> forecasts -> benchmark scores (`timemoe-eval`)."""

from .data import EvalError
from ..forecast import load_model
from .long_horizon import evaluate_long_horizon, evaluate_many

__all__ = ["EvalError", "evaluate_long_horizon", "evaluate_many", "load_model"]
