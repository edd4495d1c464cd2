"""The Time-MoE feed-forward block, native implementation: dropless top-k routing over grouped GEMMs.

Interface shared by every MoE implementation (see `build_ffn`): `forward(x_BTD) -> (y_BTD, router_logits_ND)`,
where `router_logits_ND` are the fp32 router logits of the B*T tokens in batch-major order (None for dense).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import TimeMoeConfig

# The bf16 grouped GEMM (CUTLASS, SM90+) wants every expert's row group to start at a multiple of 16 rows (and
# the whole buffer a multiple of 16, for the strides of its backward). Groups are padded to that with zero rows,
# which add nothing to any output or weight gradient.
_GROUPED_MM_ROW_ALIGN = 16
logger = logging.getLogger(__name__)


@functools.cache
def resolve_expert_gemm(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """`grouped_mm` where torch has a grouped kernel worth its padding: bf16 on SM90+ GPUs, and the CPU (its
    kernel there loops over the groups itself, without a host sync). Elsewhere (fp32 or pre-Hopper GPUs)
    `loop`: one GEMM per expert, at the cost of one host sync per layer for the group sizes."""
    gemm = requested
    if requested == "auto" and device.type == "cuda":
        fast = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
        gemm = "grouped_mm" if fast else "loop"
    elif requested == "auto":
        gemm = "grouped_mm"
    logger.info("native MoE experts: %s (model.expert_gemm=%s, %s, %s)", gemm, requested, device, dtype)
    return gemm


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

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor, gemm: str) -> torch.Tensor:
        """x_MD: token copies sorted by expert (M = tokens x top-k), `tokens_per_expert_E` of them per expert (on
        the device); returns each row through its expert."""
        if gemm == "loop":
            return self._looped(x_MD, tokens_per_expert_E)
        m, E, align = x_MD.shape[0], self.num_experts, _GROUPED_MM_ROW_ALIGN
        # Each group padded to `align` rows: static buffer size (no host sync), every group start aligned.
        padded_E = (tokens_per_expert_E + align - 1) // align * align
        offs_E = torch.cumsum(padded_E, 0, dtype=torch.int32)
        shift_E = offs_E - padded_E - (torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E)
        expert_M = torch.repeat_interleave(torch.arange(E, device=x_MD.device), tokens_per_expert_E, output_size=m)
        row_M = torch.arange(m, device=x_MD.device) + shift_E[expert_M]
        rows = -(-(m + E * (align - 1)) // align) * align
        x_PD = x_MD.new_zeros(rows, x_MD.shape[1]).index_copy(0, row_M, x_MD)
        # torch.compile knows the grouped GEMM's shapes for bf16 only: other dtypes run it eagerly.
        swiglu = _grouped_swiglu if x_MD.dtype == torch.bfloat16 else _grouped_swiglu_eager
        return swiglu(x_PD, self.gate_proj_EIH, self.up_proj_EIH, self.down_proj_EHI, offs_E)[row_M]

    def _looped(self, x_MD, tokens_per_expert_E):
        """One GEMM per expert: the group sizes are read back to the host (one sync per layer, counted by
        bench/host_syncs.py), the price of running where no grouped kernel is."""
        outs = []
        for e, x_mD in enumerate(torch.split(x_MD, tokens_per_expert_E.tolist())):
            w = [p[e].to(x_mD.dtype) for p in (self.gate_proj_EIH, self.up_proj_EIH, self.down_proj_EHI)]
            outs.append(F.linear(F.silu(F.linear(x_mD, w[0])) * F.linear(x_mD, w[1]), w[2]))
        return torch.cat(outs)


def _grouped_swiglu(x_PD, gate_EIH, up_EIH, down_EHI, offs_E):
    def gmm(a, w_EOI):
        return torch._grouped_mm(a, w_EOI.transpose(-2, -1).to(a.dtype), offs=offs_E)

    return gmm(F.silu(gmm(x_PD, gate_EIH)) * gmm(x_PD, up_EIH), down_EHI)


_grouped_swiglu_eager = torch.compiler.disable(_grouped_swiglu)


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
        self.requested_gemm = config.expert_gemm

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, weights_NK, experts_NK = route(self.gate, x_ND, self.top_k)

        # Sort the N*K (token, choice) pairs by expert; a stable sort keeps token order within each expert.
        order_M = torch.argsort(experts_NK.flatten(), stable=True)
        token_M = order_M // self.top_k
        # A scatter-add on the device: bincount would read the largest id back to the host first.
        choices_M = experts_NK.flatten()
        tokens_per_expert_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device).scatter_add_(
            0, choices_M, torch.ones_like(choices_M))
        y_MD = self.experts(x_ND[token_M], tokens_per_expert_E, resolve_expert_gemm(self.requested_gemm, x_ND.device, x_ND.dtype))
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
