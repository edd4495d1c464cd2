"""`timemoe-export CKPT_DIR OUT_DIR`: a training checkpoint -> the released HF layout, without a distributed run.

CKPT_DIR is a run's `checkpoint.dir` (the checkpoint a resume would continue from is exported, or `--tag`) or one
checkpoint directory. The checkpoint is first verified against its manifest. Its elastic part holds every weight
in fp32 under the released names (the optimizer's fp32 master copy in a bf16 run); a checkpoint without one
(ZeRO-3, or written before elastic checkpoints) is read from DeepSpeed's files, the experts of every
expert-parallel rank gathered from the per-expert files. The result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` like TimeMoE-50M. Beside the weights,
`training_data.json` names the corpus the run trained on and the benchmarks its leakage guard kept out
(`training_data.py`), which `timemoe-eval` checks.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import (BEST, CONSOLIDATED, ELASTIC, LATEST, LINEAGE, MANIFEST, META, MODEL_PREFIX,
                          CheckpointError, elastic, load_checkpoint_file, read_meta, verify)
from ..checkpoint.resume import resolve_checkpoint
from ..model import TimeMoeConfig, TimeMoeForPrediction
from ..model.config import ConfigError
from ..model.hf_layout import check_state_dict, save_hf
from .training_data import summary, write_training_data

_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
_MARKER_KEY = re.compile(r"(expert_markers\.\d+\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..+)")


def checkpoint_dir(path: str | Path, tag: str | None = None) -> tuple[Path, Path]:
    """(root, tag directory) of the checkpoint to export: the one a resume would continue from."""
    path = Path(path)
    if tag == BEST:  # the lowest validation loss's checkpoint, named by the `best` file
        if not (path / BEST).is_file():
            raise CheckpointError(f"{path}: no {BEST} file (the run did not validate: trainer.val_interval=0)")
        tag = (path / BEST).read_text().strip()
    if tag is not None:
        return path, path / tag
    if ((path / LATEST).is_file() or (path / LINEAGE).is_file()) and (found := resolve_checkpoint(path)):
        return path, path / found
    if (path / META).is_file():
        return path.parent, path
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {META}) nor a run's checkpoint.dir "
                          f"(no {LATEST} file)")


def gather_hf_state(tag_dir: Path, root: Path) -> tuple[TimeMoeConfig, dict[str, torch.Tensor], str]:
    """The full model of checkpoint `tag_dir` under the released names; also its config and precision."""
    if (tag_dir / MANIFEST).is_file():
        verify(tag_dir)
    else:
        warnings.warn(f"{tag_dir}: no {MANIFEST} (written before manifests existed): exported unverified")
    meta = read_meta(tag_dir)
    config = TimeMoeConfig(**meta["model"])
    if (tag_dir / ELASTIC).is_dir():
        return config, elastic.read_weights(tag_dir / ELASTIC), meta["precision"]

    def load(name):
        return load_checkpoint_file(tag_dir / name, root, engine_classes=False)

    if meta["zero_stage"] == 3:
        shared = load(CONSOLIDATED)
    else:
        shared = load("mp_rank_00_model_states.pt")["module"]
    shared = {k[len(MODEL_PREFIX):]: v for k, v in shared.items() if k.startswith(MODEL_PREFIX)}
    aliases = meta["expert_aliases"]
    if not aliases:  # native experts (or ZeRO-3): the shared file holds every weight
        return config, _native_names(shared, config), meta["precision"]

    from ..model.state_dict_adapter import megatron_to_hf

    ep_size = meta["ep_size"]
    per_rank = config.num_experts // ep_size
    ranks = [dict(shared) for _ in range(ep_size)]  # megatron-layout state of each EP rank
    files = sorted(p for p in tag_dir.iterdir() if _EXPERT_FILE.fullmatch(p.name))
    for path in tqdm(files, desc="experts", unit="file", disable=len(files) < 64):
        for key, value in load(path.name).items():
            m = _MARKER_KEY.fullmatch(key)
            if m is None:
                raise CheckpointError(f"{path}: unexpected entry {key!r}")
            ep_rank, local = divmod(int(m[2]), per_rank)
            canonical = aliases[f"{m[1]}{local}{m[3]}"]
            ranks[ep_rank][canonical[len(MODEL_PREFIX):]] = value
    hf = {}
    for ep_rank, state in enumerate(ranks):
        hf.update(megatron_to_hf(state, config, ep_rank, ep_size))
    return config, hf, meta["precision"]


def _native_names(state: dict, config: TimeMoeConfig) -> dict:
    """A native or megatron model's own names -> the released ones (stacked experts are split by the model)."""
    model = TimeMoeForPrediction(_released(config))
    if config.moe_impl == "megatron" and not config.use_dense:
        from ..model.state_dict_adapter import megatron_to_hf

        state = megatron_to_hf(state, config)
    model.load_state_dict(state, strict=True)
    return model.state_dict()


def _released(config: TimeMoeConfig) -> TimeMoeConfig:
    import dataclasses

    return dataclasses.replace(config, moe_impl="native", aux_loss_type="timemoe", gradient_checkpointing=False)


def export(ckpt: str | Path, out: str | Path, tag: str | None = None, dtype: str | None = None) -> Path:
    root, tag_dir = checkpoint_dir(ckpt, tag)
    config, hf, precision = gather_hf_state(tag_dir, root)
    check_state_dict({k: v.shape for k, v in hf.items()}, config, f"checkpoint {tag_dir}")
    model = TimeMoeForPrediction(_released(config))
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype or precision]
    path = save_hf(model, out, dtype=target)
    write_training_data(tag_dir, path)
    _readable_by_all(path)
    return path


def _readable_by_all(out: Path) -> None:
    """An export is made to be shared (served, uploaded, read by other accounts): whatever the umask or the
    permissions of the installed remote-code files, everyone may read it; only the owner writes."""
    out.chmod(0o755)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _replaces_an_export(out: Path) -> list[str]:
    """The files of an earlier export (or anything else) `out` already holds."""
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="timemoe-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint.dir, or one checkpoint directory in it")
    parser.add_argument("out", help="output directory (config.json, model.safetensors, remote code)")
    parser.add_argument("--tag", help="checkpoint to export instead of the latest (e.g. step00001000, or best: the lowest "
                             "validation loss's)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="weight dtype (default: the training precision)")
    parser.add_argument("--force", action="store_true", help="write into an OUT_DIR that is not empty (replacing "
                        "the files of an earlier export)")
    args = parser.parse_args(argv)
    try:
        there = _replaces_an_export(Path(args.out))
        if there and not args.force:
            raise FileExistsError(f"{args.out}: not empty ({', '.join(there[:4])}{', ...' * (len(there) > 4)}); "
                                  "pass --force to replace an earlier export, or choose another directory")
        root, tag_dir = checkpoint_dir(args.checkpoint, args.tag)
        path = export(tag_dir, args.out, dtype=args.dtype)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"timemoe-export: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported step {read_meta(tag_dir)['step']} ({tag_dir}) to {path}")
    print(summary(path))


if __name__ == "__main__":
    main()
