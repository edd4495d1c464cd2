"""The Time-MoE feed-forward block, native implementation: dropless top-k routing over grouped GEMMs.

Interface shared by every MoE implementation (see `build_ffn`): `forward(x_BTD) -> (y_BTD, router_logits_ND)`,
where `router_logits_ND` are the fp32 router logits of the B*T tokens in batch-major order (None for dense).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TimeMoeConfig

# torch._grouped_mm wants row strides that are multiples of 16 bytes (its backward transposes the token matrix),
# so the sorted token buffer is padded to a multiple of this many rows; rows past the last offset are ignored.
_GROUPED_MM_ROW_ALIGN = 16


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`, no biases: the shared expert and the dense FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Released per-expert projection name -> stacked parameter name.
_STACKED = {"gate_proj": "gate_proj_EIH", "up_proj": "up_proj_EIH", "down_proj": "down_proj_EHI"}


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked `[E, out, in]` weights so one grouped GEMM runs them all.

    The state dict still holds the released per-expert names (`M.gate_proj.weight` …), through the hooks below.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj_EIH = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))
        self.up_proj_EIH = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))
        self.down_proj_EHI = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.register_state_dict_post_hook(_split_experts)
        self.register_load_state_dict_pre_hook(_stack_experts)

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_MD: token copies sorted by expert (M = tokens x top-k); returns each row through its expert."""
        m = x_MD.shape[0]
        padded = -(-m // _GROUPED_MM_ROW_ALIGN) * _GROUPED_MM_ROW_ALIGN
        if padded != m:
            x_MD = F.pad(x_MD, (0, 0, 0, padded - m))
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)

        def gmm(a, w_EOI):
            return torch._grouped_mm(a, w_EOI.transpose(-2, -1).to(a.dtype), offs=offs_E)

        h_MI = F.silu(gmm(x_MD, self.gate_proj_EIH)) * gmm(x_MD, self.up_proj_EIH)
        return gmm(h_MI, self.down_proj_EHI)[:m]


def _split_experts(module: GroupedExperts, state_dict, prefix, local_metadata):
    for proj, name in _STACKED.items():
        if state_dict[prefix + name].numel() == 0:  # a ZeRO-3 partition placeholder: nothing to split
            continue
        stacked = state_dict.pop(prefix + name)
        for e in range(module.num_experts):
            state_dict[f"{prefix}{e}.{proj}.weight"] = stacked[e]


def _stack_experts(module: GroupedExperts, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for proj, name in _STACKED.items():
        keys = [f"{prefix}{e}.{proj}.weight" for e in range(module.num_experts)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def route(gate: nn.Linear, x_ND: torch.Tensor, top_k: int):
    """fp32 router: softmax over all experts, then top-k *without* renormalising (as the released models do)."""
    logits_NE = F.linear(x_ND.float(), gate.weight.float())
    probs_NE = torch.softmax(logits_NE, dim=-1)
    weights_NK, experts_NK = torch.topk(probs_NE, top_k, dim=-1)
    return logits_NE, weights_NK, experts_NK


class TimeMoeSparseExpertsLayer(nn.Module):
    """Σ_topk p_i·expert_i(x) + sigmoid(shared_expert_gate(x))·shared_expert(x); dropless."""

    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, weights_NK, experts_NK = route(self.gate, x_ND, self.top_k)

        # Sort the N*K (token, choice) pairs by expert; a stable sort keeps token order within each expert.
        order_M = torch.argsort(experts_NK.flatten(), stable=True)
        token_M = order_M // self.top_k
        tokens_per_expert_E = torch.bincount(experts_NK.flatten(), minlength=self.num_experts)
        y_MD = self.experts(x_ND[token_M], tokens_per_expert_E)
        # The released models cast the routing weights to the activations' dtype before mixing.
        y_MD = y_MD * weights_NK.flatten()[order_M].to(y_MD.dtype).unsqueeze(-1)
        routed_ND = torch.zeros_like(x_ND).index_add_(0, token_M, y_MD)

        shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)
        return (routed_ND + shared_ND).view(B, T, D), logits_NE


class DenseFFN(SwiGLU):
    """`use_dense: true`: one SwiGLU MLP, so its weights are named `ffn_layer.{gate,up,down}_proj`."""

    def __init__(self, config: TimeMoeConfig):
        super().__init__(config.hidden_size, config.intermediate_size)

    def forward(self, x_BTD):
        return super().forward(x_BTD), None


def build_ffn(config: TimeMoeConfig) -> nn.Module:
    if config.use_dense:
        return DenseFFN(config)
    if config.moe_impl == "megatron":
        from .moe_megatron import MegatronMoELayer  # megatron-core is imported only when asked for

        return MegatronMoELayer(config)
    return TimeMoeSparseExpertsLayer(config)
