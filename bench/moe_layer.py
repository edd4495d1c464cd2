"""Forward+backward time of the MoE feed-forward block, as ratios to a dense SwiGLU of equal active parameters.

Measured side by side in one run, repeats interleaved (the machine is shared), medians reported:
- native:    `moe.TimeMoeSparseExpertsLayer` (sort by expert + the expert GEMM `model.expert_gemm=auto` picks here)
- native loop: the same block with one GEMM per expert (`expert_gemm=loop`, the fallback)
- megatron:  `moe_megatron.MegatronMoELayer` (megatron-core MoELayer, alltoall dispatcher)
- mask loop: the released implementation's scheme, one boolean mask + gather + index_add per expert
- dense:     one SwiGLU of width shared + top_k * expert width (the parameters each token activates)
Goals: native and megatron <= 1.25x dense, and clearly faster than the mask loop (the last line: each block's median
as a ratio to dense). The best (minimum) time is printed next to the median: on a machine shared with other jobs it
is the steadier estimate of the cost.

    python bench/moe_layer.py [--tokens 4096] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from timemoe_train.model.config import TimeMoeConfig
from timemoe_train.model.moe import SwiGLU, TimeMoeSparseExpertsLayer, route


class MaskLoopMoE(nn.Module):
    """The released per-expert loop: for each expert, select its tokens with a mask, run it, index_add."""

    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.expert_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BTD):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, weights_NK, experts_NK = route(self.gate, x_ND, self.top_k)
        weights_NK = weights_NK.to(x_ND.dtype)
        mask_ENK = F.one_hot(experts_NK, self.num_experts).permute(2, 0, 1)
        routed_ND = torch.zeros_like(x_ND)
        for e, expert in enumerate(self.experts):
            token_M, choice_M = torch.where(mask_ENK[e])
            y_MD = expert(x_ND[token_M]) * weights_NK[token_M, choice_M, None]
            routed_ND.index_add_(0, token_M, y_MD)
        shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)
        return (routed_ND + shared_ND).view(B, T, D), logits_NE


class DenseSwiGLU(SwiGLU):
    def forward(self, x_BTD):
        return super().forward(x_BTD), None


def build_blocks(config: TimeMoeConfig) -> dict[str, nn.Module]:
    from timemoe_train.model.moe_megatron import MegatronMoELayer
    from timemoe_train.parallel import init_parallel

    init_parallel(num_experts=config.num_experts)  # megatron's layer needs its groups: a one-process layout

    active = config.intermediate_size + config.num_experts_per_tok * config.expert_intermediate_size
    blocks = {
        "dense": DenseSwiGLU(config.hidden_size, active),
        "native": TimeMoeSparseExpertsLayer(config),
        "native loop": TimeMoeSparseExpertsLayer(dataclasses.replace(config, expert_gemm="loop")),
        "megatron": MegatronMoELayer(config),
        "mask loop": MaskLoopMoE(config),
    }
    for block in blocks.values():
        for p in block.parameters():
            nn.init.normal_(p, std=config.initializer_range)
    return blocks


def time_fwd_bwd(block: nn.Module, x_BTD: torch.Tensor, grad_BTD: torch.Tensor) -> float:
    x_BTD = x_BTD.detach().requires_grad_(True)
    sync = torch.cuda.synchronize if x_BTD.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    y_BTD, _ = block(x_BTD)
    y_BTD.backward(grad_BTD)
    sync()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="base", help="TimeMoeConfig preset giving the layer sizes")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = TimeMoeConfig.preset(args.preset)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    blocks = {name: b.to(device, dtype) for name, b in build_blocks(config).items()}
    batch = max(1, args.tokens // 1024)
    x_BTD = torch.randn(batch, args.tokens // batch, config.hidden_size, device=device, dtype=dtype)
    grad_BTD = torch.randn_like(x_BTD)

    times = {name: [] for name in blocks}
    for r in range(args.warmup + args.repeats):
        for name, block in blocks.items():  # interleaved: slow phases of a shared machine hit every block
            block.zero_grad(set_to_none=True)
            t = time_fwd_bwd(block, x_BTD, grad_BTD)
            if r >= args.warmup:
                times[name].append(t)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print(f"MoE block fwd+bwd, preset={args.preset} (H={config.hidden_size}, {config.num_experts} experts, "
          f"top-{config.num_experts_per_tok}), {x_BTD.shape[0] * x_BTD.shape[1]} tokens, {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(f"  {'block':<11} {'median':>9} {'x dense':>8}   {'best':>9} {'x dense':>8}")
    for name in times:
        print(f"  {name:<11} {medians[name] * 1e3:6.0f} ms {medians[name] / medians['dense']:7.2f}x   "
              f"{best[name] * 1e3:6.0f} ms {best[name] / best['dense']:7.2f}x")
    print("MoE block time / dense SwiGLU time (median): "
          + ", ".join(f"{name} {medians[name] / medians['dense']:.2f}x" for name in times if name != "dense"))


if __name__ == "__main__":
    main()
