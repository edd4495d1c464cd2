"""The Hugging Face layout: `config.json` + `model.safetensors` (+ the remote code that lets
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` build the model). Loading never unpickles."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.format import CheckpointError
from .config import TimeMoeConfig

REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
WEIGHTS_NAME = "model.safetensors"
# What the model was trained on (written by timemoe-export, read by timemoe-eval; see export/training_data.py).
TRAINING_DATA = "training_data.json"


def hf_state_dict(model, ep_rank: int = 0, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """The model's weights under the released names, whatever MoE implementation it runs (with expert
    parallelism, EP rank `ep_rank`'s experts under their global numbers)."""
    if model.config.moe_impl == "megatron" and not model.config.use_dense:
        from .state_dict_adapter import megatron_to_hf

        return megatron_to_hf(model.state_dict(), model.config, ep_rank, ep_size)
    return model.state_dict()


def released_view(model, tensors: dict[str, torch.Tensor], ep_rank: int = 0,
                  ep_size: int = 1) -> dict[str, torch.Tensor]:
    """`tensors` (one per parameter of `model`, by `named_parameters()` name, of that parameter's shape: its
    fp32 copy, an optimizer moment …) under the released names, as views: writing into the result writes into
    `tensors`. The same mapping as `hf_state_dict`, because it is `hf_state_dict` with the parameters' storage
    swapped for `tensors` meanwhile."""
    params = dict(model.named_parameters())
    own = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = tensors[name]
        return dict(hf_state_dict(model, ep_rank, ep_size))
    finally:
        for name, p in params.items():
            p.data = own[name]


def expected_shapes(config: TimeMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released layout with its shape, derived from the config alone."""
    H, C = config.hidden_size, config.input_size
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_layer.emb_layer.weight": (H, C), "model.embed_layer.gate_layer.weight": (H, C),
              "model.norm.weight": (H,)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.q_proj.bias": (H,),
            p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (H, H),
        })
        f = p + "ffn_layer."
        if config.use_dense:
            I = config.intermediate_size
            shapes.update({f + "gate_proj.weight": (I, H), f + "up_proj.weight": (I, H), f + "down_proj.weight": (H, I)})
            continue
        I, Ie = config.intermediate_size, config.expert_intermediate_size
        shapes.update({f + "gate.weight": (config.num_experts, H), f + "shared_expert_gate.weight": (1, H),
                       f + "shared_expert.gate_proj.weight": (I, H), f + "shared_expert.up_proj.weight": (I, H),
                       f + "shared_expert.down_proj.weight": (H, I)})
        for m in range(config.num_experts):
            e = f"{f}experts.{m}."
            shapes.update({e + "gate_proj.weight": (Ie, H), e + "up_proj.weight": (Ie, H),
                           e + "down_proj.weight": (H, Ie)})
    for j, h in enumerate(config.horizon_lengths):
        shapes[f"lm_heads.{j}.out_layer.weight"] = (C * h, H)
    return shapes


def check_state_dict(state: dict[str, tuple[int, ...]], config: TimeMoeConfig, source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    misshaped = sorted(f"{k}: {tuple(state[k])} (expected {want[k]})"
                       for k in set(want) & set(state) if tuple(state[k]) != want[k])
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(items)}): {', '.join(items)}"
                 for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if items]
        raise CheckpointError(f"{source} does not match its config.json:\n  " + "\n  ".join(parts))


def save_hf(model, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in hf_state_dict(model).items()}
    check_state_dict({k: v.shape for k, v in state.items()}, model.config, f"model being saved to {out}")
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save(out)
    for src in sorted(REMOTE_CODE_DIR.glob("*.py")):
        shutil.copyfile(src, out / src.name)
    return out


def owned_names(config: TimeMoeConfig, ep_rank: int = 0, ep_size: int = 1) -> dict[str, tuple[int, ...]]:
    """The released tensors EP rank `ep_rank` of `ep_size` holds, with their shapes: everything but the experts
    of the other ranks."""
    per_rank = config.num_experts // ep_size
    mine = {str(e) for e in range(ep_rank * per_rank, (ep_rank + 1) * per_rank)}
    return {name: shape for name, shape in expected_shapes(config).items()
            if ".experts." not in name or name.split(".experts.")[1].split(".")[0] in mine}


def read_hf_weights(directory: str | Path, config: TimeMoeConfig,
                    names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of an HF-layout directory, checked against `config`; `names`: only those tensors are read."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (only safetensors weights are loaded; pickled .bin files are "
                              "refused because unpickling can run arbitrary code)")
    with safe_open(str(path), framework="pt") as f:
        check_state_dict({k: f.get_slice(k).get_shape() for k in f.keys()}, config, str(path))
        return {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}


def load_hf_state(model, hf_state: dict[str, torch.Tensor], ep_rank: int = 0, ep_size: int = 1):
    """The inverse of `hf_state_dict`: weights under the released names into `model`, whatever MoE implementation
    it runs (with expert parallelism, the experts of EP rank `ep_rank` only)."""
    state = hf_state
    if model.config.moe_impl == "megatron" and not model.config.use_dense:
        from .state_dict_adapter import hf_to_megatron

        state = hf_to_megatron(hf_state, model.config, ep_rank, ep_size)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def load_hf(model_cls, directory: str | Path, **config_overrides):
    config = TimeMoeConfig.load(directory, **config_overrides)
    return load_hf_state(model_cls(config), read_hf_weights(directory, config))
