"""What the engine wraps: the model, its layout-independent initial weights, and DeepSpeed's expert markers."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..checkpoint import MODEL_PREFIX
from ..model.hf_layout import owned_names, read_hf_weights
from ..model.init import draw_released
from ..model import TimeMoeConfig, TimeMoeForPrediction
from .config import TrainConfigError

MARKERS_PREFIX = "expert_markers."
# config.json keys that must agree for released weights to mean the same model (the rest are training choices).
ARCHITECTURE_KEYS = ("input_size", "hidden_size", "intermediate_size", "horizon_lengths", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "hidden_act", "num_experts_per_tok",
                     "num_experts", "rms_norm_eps", "use_dense", "rope_theta")


class TrainModule(nn.Module):
    """`model` plus, for megatron's MoE layers, one `ExpertMarker` each (`expert_markers.<layer>`).

    A marker registers the same expert parameters a second time. The state dict keeps them only under the
    marker's name (DeepSpeed writes those to per-expert files and leaves them out of the shared file);
    `load_model_state` maps them back. `expert_aliases`: marker name -> model name of every expert parameter.
    """

    def __init__(self, model: TimeMoeForPrediction, ep_size: int, with_markers: bool):
        super().__init__()
        self.model = model
        self.expert_aliases: dict[str, str] = {}
        layers = megatron_moe_layers(model) if with_markers else []
        if not layers:
            return
        from ..model.moe_megatron import drop_extra_state
        from .ep_adapter import ExpertMarker, check_versions

        check_versions()
        self.expert_markers = nn.ModuleList(
            ExpertMarker(local_expert_modules(layer), model.config.num_experts, ep_size) for layer in layers)
        canonical = {id(p): n for n, p in self.named_parameters() if not n.startswith(MARKERS_PREFIX)}
        self.expert_aliases = {n: canonical[id(p)] for n, p in self.named_parameters(remove_duplicate=False)
                               if n.startswith(MARKERS_PREFIX)}
        self._register_state_dict_hook(_drop_canonical_expert_names)
        self.register_state_dict_post_hook(drop_extra_state)

    def forward(self, **batch):
        return self.model(**batch)

    def load_model_state(self, src: dict[str, torch.Tensor], dst: nn.Module | None = None) -> None:
        """DeepSpeed's `custom_load_fn`: the saved shared + per-expert entries into the model, strictly."""
        state = {}
        for key, value in src.items():
            key = self.expert_aliases.get(key, key)
            if not key.startswith(MODEL_PREFIX):
                raise KeyError(f"checkpoint entry {key!r} belongs to no parameter of this model")
            state[key[len(MODEL_PREFIX):]] = value
        self.model.load_state_dict(state, strict=True)


def _drop_canonical_expert_names(module: TrainModule, state_dict, prefix, local_metadata):
    for name in module.expert_aliases.values():
        state_dict.pop(prefix + name, None)


def megatron_moe_layers(model: nn.Module) -> list[nn.Module]:
    if model.config.moe_impl != "megatron" or model.config.use_dense:
        return []
    from ..model.moe_megatron import MegatronMoELayer

    return [m for m in model.modules() if isinstance(m, MegatronMoELayer)]


_GROUPED_WEIGHT = re.compile(r"weight(\d+)")


def local_expert_modules(layer: nn.Module) -> nn.ModuleList:
    """One module per local expert with `linear_fc1.weight` / `linear_fc2.weight`, sharing the layer's tensors:
    SequentialMLP has them already; TE's grouped experts keep `linear_fc{1,2}.weight<i>` side by side."""
    experts = layer.experts
    if hasattr(experts, "local_experts"):
        return experts.local_experts
    holders = nn.ModuleList(nn.Module() for _ in range(experts.num_local_experts))
    for linear in ("linear_fc1", "linear_fc2"):
        for name, p in getattr(experts, linear).named_parameters(recurse=False):
            if m := _GROUPED_WEIGHT.fullmatch(name):
                holder = holders[int(m[1])]
                if not hasattr(holder, linear):
                    setattr(holder, linear, nn.Module())
                getattr(holder, linear).register_parameter("weight", p)
    return holders


def initial_hf_state(config: TimeMoeConfig, seed: int, init_from_hf: str | None, ep_rank: int = 0,
                     ep_size: int = 1) -> dict[str, torch.Tensor]:
    """The starting weights EP rank `ep_rank` of `ep_size` holds, under the released names, the same for every
    parallel layout: read from an HF-layout directory (only those tensors), or each drawn from its own
    generator seeded by (`seed`, its name). No rank reads or draws what another rank holds."""
    owned = owned_names(config, ep_rank, ep_size)
    if init_from_hf:
        saved = TimeMoeConfig.load(init_from_hf)
        differ = {k: (getattr(saved, k), getattr(config, k)) for k in ARCHITECTURE_KEYS
                  if getattr(saved, k) != getattr(config, k)}
        if differ:
            raise TrainConfigError(
                f"trainer.init_from_hf={init_from_hf!r}: its config.json differs from the model config in "
                + ", ".join(f"{k} (checkpoint {a!r}, run {b!r})" for k, (a, b) in sorted(differ.items())))
        return read_hf_weights(init_from_hf, config, owned)
    return draw_released(config, seed, owned)

