"""Loading an HF-layout directory for forecasting: timemoe-train's own model or the directory's own code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..model import ConfigError, TimeMoeForPrediction

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUTO = "auto"  # bf16 where the device has bf16 matrix units; README "Export and serve" has what it costs
BACKENDS = ("native", "remote")


class ForecastError(ValueError):
    """Bad input to forecasting: the message names the file or option, and the value."""


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a GPU and on a CPU with bf16 matrix instructions (AMX, AVX512-BF16), float32 elsewhere."""
    if dtype != AUTO:
        return dtype
    if torch.device(device).type == "cuda":
        return "bfloat16"
    cpu = torch.cpu
    fast = getattr(cpu, "_is_amx_tile_supported", lambda: False)() or \
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bfloat16" if fast else "float32"


def load_model(model_dir: str | Path, backend: str = "native", device: str = "cpu", dtype: str = "float32"):
    """Any HF-layout directory, ours or the released format. "remote" runs the directory's own modeling code
    through transformers (trust_remote_code), as a serving stack would. dtype: one of DTYPES, or `auto`."""
    dtype = resolve_dtype(dtype, device)
    path = Path(model_dir)
    if not path.is_dir():
        raise ForecastError(f"{path}: model directory not found")
    if backend not in BACKENDS or dtype not in DTYPES:
        raise ForecastError(f"backend={backend!r}, dtype={dtype!r}: choose a backend from {BACKENDS} and a dtype "
                            f"from {tuple(DTYPES)}")
    try:
        if backend == "native":
            model = TimeMoeForPrediction.from_pretrained(path)
        else:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    except (ConfigError, CheckpointError, OSError, ValueError) as e:
        raise ForecastError(f"model directory {path}: {e}") from None
    return model.to(device=device, dtype=DTYPES[dtype]).eval()
