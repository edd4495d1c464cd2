"""Weight names of the megatron MoE block <-> the released (HF) ones. Only `ffn_layer.*` differs.

| released (HF)                                   | megatron                                              |
|-------------------------------------------------|-------------------------------------------------------|
| gate.weight                                     | router.weight                                         |
| experts.M.{gate,up}_proj.weight                 | experts.local_experts.i.linear_fc1.weight (SequentialMLP) |
|                                                 | experts.linear_fc1.weight{i}              (TE grouped)|
| experts.M.down_proj.weight                      | …linear_fc2…                                          |
| shared_expert.{gate,up}_proj.weight             | shared_experts.linear_fc1.weight                      |
| shared_expert.down_proj.weight                  | shared_experts.linear_fc2.weight                      |
| shared_expert_gate.weight                       | shared_experts.gate_weight                            |

`linear_fc1` is the gate_proj rows first, then up_proj (megatron applies silu to the first half of fc1's output).
Under expert parallelism EP rank r holds local experts i = 0 … E/EP-1, which are global experts r·E/EP + i.
"""

from __future__ import annotations

import re

import torch

from .config import TimeMoeConfig


class StateDictMappingError(KeyError):
    def __str__(self):
        return str(self.args[0])


_SEQUENTIAL = re.compile(r"experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight")
_GROUPED = re.compile(r"experts\.(linear_fc[12])\.weight(\d+)")
_SHARED = re.compile(r"shared_experts\.(linear_fc[12])\.weight")


def _experts_per_rank(config: TimeMoeConfig, ep_rank: int, ep_size: int) -> int:
    if ep_size < 1 or config.num_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise StateDictMappingError(
            f"ep_rank={ep_rank}, ep_size={ep_size}: need 0 <= ep_rank < ep_size and ep_size dividing "
            f"num_experts={config.num_experts}")
    return config.num_experts // ep_size


def _moe_prefixes(keys, marker: str) -> list[str]:
    """Prefixes `….ffn_layer.` of the MoE blocks, found by a key every block has."""
    return sorted({k[: -len(marker)] for k in keys if k.endswith("ffn_layer." + marker)})


def megatron_to_hf(state_dict: dict, config: TimeMoeConfig, ep_rank: int = 0, ep_size: int = 1) -> dict:
    """A megatron model's state dict under the released names. With ep_size > 1 only this rank's experts are
    present, under their global numbers (the export step gathers the ranks)."""
    if config.use_dense:
        return dict(state_dict)
    per_rank = _experts_per_rank(config, ep_rank, ep_size)
    out = {}
    for key, value in state_dict.items():
        head, sep, rest = key.partition("ffn_layer.")
        if not sep:
            out[key] = value
            continue
        p = head + sep
        if rest == "router.weight":
            out[p + "gate.weight"] = value
        elif rest == "shared_experts.gate_weight":
            out[p + "shared_expert_gate.weight"] = value
        elif m := _SHARED.fullmatch(rest):
            _put_swiglu(out, p + "shared_expert.", m[1], value)
        elif m := _SEQUENTIAL.fullmatch(rest):
            _put_swiglu(out, f"{p}experts.{ep_rank * per_rank + int(m[1])}.", m[2], value)
        elif m := _GROUPED.fullmatch(rest):
            _put_swiglu(out, f"{p}experts.{ep_rank * per_rank + int(m[2])}.", m[1], value)
        else:
            raise StateDictMappingError(f"megatron state dict: no released name for {key!r}")
    return out


def _put_swiglu(out: dict, prefix: str, linear: str, value: torch.Tensor) -> None:
    if linear == "linear_fc1":
        out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = value.chunk(2, dim=0)
    else:
        out[prefix + "down_proj.weight"] = value


def hf_to_megatron(hf_state: dict, config: TimeMoeConfig, ep_rank: int = 0, ep_size: int = 1) -> dict:
    """A full released state dict under the names of a megatron model built in this process; with ep_size > 1,
    only EP rank `ep_rank`'s experts (how a released checkpoint is loaded at any EP size)."""
    if config.use_dense:
        return dict(hf_state)
    from .moe_megatron import uses_te_grouped_experts

    per_rank = _experts_per_rank(config, ep_rank, ep_size)
    expert_names = _GROUPED_NAMES if uses_te_grouped_experts(config) else _SEQUENTIAL_NAMES
    known = {"gate.weight", "shared_expert_gate.weight"} | {
        f"{e}{proj}.weight" for e in ["shared_expert."] + [f"experts.{m}." for m in range(config.num_experts)]
        for proj in ("gate_proj", "up_proj", "down_proj")}
    prefixes = _moe_prefixes(hf_state, "gate.weight")
    out = {k: v for k, v in hf_state.items() if not k.startswith(tuple(prefixes))}
    for p in prefixes:
        unknown = sorted(k for k in hf_state if k.startswith(p) and k[len(p):] not in known)
        if unknown:
            raise StateDictMappingError(f"released state dict: unexpected MoE weights {unknown}")
        block = _Block(hf_state, p)
        out[p + "router.weight"] = block.take("gate.weight")
        out[p + "shared_experts.gate_weight"] = block.take("shared_expert_gate.weight")
        out[p + "shared_experts.linear_fc1.weight"] = block.fc1("shared_expert.")
        out[p + "shared_experts.linear_fc2.weight"] = block.take("shared_expert.down_proj.weight")
        for i in range(per_rank):
            e = f"experts.{ep_rank * per_rank + i}."
            fc1_name, fc2_name = expert_names
            out[p + fc1_name.format(i)] = block.fc1(e)
            out[p + fc2_name.format(i)] = block.take(e + "down_proj.weight")
    return out


_SEQUENTIAL_NAMES = ("experts.local_experts.{}.linear_fc1.weight", "experts.local_experts.{}.linear_fc2.weight")
_GROUPED_NAMES = ("experts.linear_fc1.weight{}", "experts.linear_fc2.weight{}")


class _Block:
    """The released weights of one MoE block (keys under `prefix`)."""

    def __init__(self, hf_state: dict, prefix: str):
        self.hf_state, self.prefix = hf_state, prefix

    def take(self, name: str) -> torch.Tensor:
        try:
            return self.hf_state[self.prefix + name]
        except KeyError:
            raise StateDictMappingError(f"released state dict: {self.prefix + name!r} is missing") from None

    def fc1(self, swiglu: str) -> torch.Tensor:
        return torch.cat([self.take(swiglu + "gate_proj.weight"), self.take(swiglu + "up_proj.weight")], dim=0)
