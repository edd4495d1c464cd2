"""The released-style Time-MoE code the benches' reference arms run (modeling_time_moe.py here, see its docstring)."""

from __future__ import annotations

import shutil
from pathlib import Path

MODELING = Path(__file__).with_name("modeling_time_moe.py")


def released_style_copy(export_dir: Path, out_dir: Path) -> Path:
    """A copy of an HF export whose modeling file is the released-style one: loaded with
    `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`, it computes the same function on the same
    weights the released code's way. The folder needs a name of its own: transformers caches remote modules by
    folder name."""
    shutil.copytree(export_dir, out_dir)
    shutil.copyfile(MODELING, out_dir / MODELING.name)
    return out_dir
