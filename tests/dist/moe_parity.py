"""Helpers shared by the megatron MoE tests and their torchrun worker: one set of weights in both blocks."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from timemoe_train.model.config import TimeMoeConfig
from timemoe_train.model.moe import _STACKED, TimeMoeSparseExpertsLayer
from timemoe_train.model.moe_megatron import MegatronMoELayer
from timemoe_train.model.state_dict_adapter import hf_to_megatron, megatron_to_hf

_UNSTACK = {stacked: proj for proj, stacked in _STACKED.items()}


def block_pair(config: TimeMoeConfig, ep_rank: int = 0, ep_size: int = 1, seed: int = 0):
    """A native block with random weights and a megatron block loaded from it through the adapter, both wrapped
    as `ffn_layer` so that their state-dict keys look like the model's."""
    torch.manual_seed(seed)
    native = nn.ModuleDict({"ffn_layer": TimeMoeSparseExpertsLayer(config)})
    for p in native.parameters():
        nn.init.normal_(p, std=0.2)
    megatron = nn.ModuleDict({"ffn_layer": MegatronMoELayer(dataclasses.replace(config, moe_impl="megatron"))})
    megatron.load_state_dict(hf_to_megatron(native.state_dict(), config, ep_rank, ep_size), strict=True)
    return native, megatron


def hf_grads(module: nn.Module, config: TimeMoeConfig, ep_rank: int = 0, ep_size: int = 1) -> dict:
    """Parameter gradients under the released names, whichever block produced them."""
    grads = {name: p.grad for name, p in module.named_parameters()}
    if any("router" in name for name in grads):
        return megatron_to_hf(grads, config, ep_rank, ep_size)
    out = {}
    for name, grad in grads.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in _UNSTACK:
            out.update({f"{prefix}.{e}.{_UNSTACK[leaf]}.weight": g for e, g in enumerate(grad)})
        else:
            out[name] = grad
    return out


def forward_backward(module: nn.Module, x_BTD: torch.Tensor, seed: int = 1):
    """Outputs, router logits and input gradient under a loss that weights every output and logit."""
    x_BTD = x_BTD.detach().clone().requires_grad_(True)
    y_BTD, logits_NE = module["ffn_layer"](x_BTD)
    g = torch.Generator().manual_seed(seed)
    loss = (y_BTD * torch.randn(y_BTD.shape, generator=g)).sum() + \
        (logits_NE * torch.randn(logits_NE.shape, generator=g)).sum()
    loss.backward()
    return y_BTD.detach(), logits_NE.detach(), x_BTD.grad


def rel_diff(a, b) -> float:
    """max |a - b| relative to the reference's largest magnitude; dicts are compared key by key."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
        return max(rel_diff(a[k], b[k]) for k in a)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def reference_megatron_losses(x_ND, weight_EH, top_k, coeff, z_coeff):
    """megatron's Switch balancing loss of one layer, written from its definition (E/(k·N²) Σ_e count_e Σ_n p_ne),
    ST-MoE's z-loss (mean of logsumexp²), and the weighted sum that reaches the gradient."""
    logits_NE = x_ND @ weight_EH.T
    probs_NE = torch.softmax(logits_NE, -1)
    count_E = torch.bincount(probs_NE.topk(top_k, -1).indices.flatten(), minlength=weight_EH.shape[0])
    n, e = logits_NE.shape
    balance = e / (top_k * n * n) * (probs_NE.sum(0) * count_E).sum()
    z = torch.logsumexp(logits_NE, -1).square().mean()
    return balance, z, coeff * balance + z_coeff * z
