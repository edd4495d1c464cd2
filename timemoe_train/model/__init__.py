"""The one Time-MoE model definition (released state-dict names); parallelism and engines wrap it."""

from .config import PRESETS, ConfigError, TimeMoeConfig
from .modeling import TimeMoeForPrediction, TimeMoeOutput, load_balancing_loss

__all__ = ["PRESETS", "ConfigError", "TimeMoeConfig", "TimeMoeForPrediction", "TimeMoeOutput", "load_balancing_loss"]
