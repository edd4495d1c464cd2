"""HF-layout checkpoints -> forecasts of users' own series (`timemoe-forecast`).

Its own stage of the data's journey, between `export/` (which writes the HF layout) and `evaluate/` (which scores
forecasts against held-out truth): serving is what users do with an export, and evaluation is one consumer of it,
so `evaluate/` loads its models through `load_model` here rather than the other way round.
"""

from .batched import forecast_contexts
from .model import BACKENDS, DTYPES, ForecastError, load_model

__all__ = ["BACKENDS", "DTYPES", "ForecastError", "forecast_contexts", "load_model"]
