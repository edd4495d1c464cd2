"""The autoregressive roll-out behind every forecast: z-normalise each context by itself, feed it through the decoder
once (filling a KV cache), then feed back what the largest head that does not overshoot the points still needed
predicted, until the horizon is reached; de-normalise.

One roll-out serves several horizons exactly as separate roll-outs would. Two horizons take the same steps while
they would pick the same heads; where they would pick different ones, both heads read the same hidden state (one
forward, two heads), and only a horizon that still needs points after that goes on with a copy of the KV cache. For
heads [1, 8, 32, 64] and horizons 96/192/336/720 that is the forwards of h720 plus one for h336 (h96 = 64 + 32 and
h192 = 3 × 64 branch off h720's second and third forwards; h336 = 5 × 64 + 8 + 8 off its sixth).

Rows of different context lengths share a batch left-padded (`lengths_B`): padding is kept out of each row's
statistics and attention, and positions count real points only, so each row gets what it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def head_schedule(horizon: int, head_horizons: Sequence[int]) -> list[int]:
    """The heads (indices) a roll-out to `horizon` uses, in order: each the largest that does not overshoot."""
    out, remaining = [], horizon
    while remaining > 0:
        j = max(i for i, h in enumerate(head_horizons) if h <= remaining)
        out.append(j)
        remaining -= head_horizons[j]
    return out


@dataclass
class _Branch:
    """Horizons that share every step so far: the KV cache of those steps, the next input, the points so far."""

    cache: list
    input_BT: torch.Tensor
    chunks: list[torch.Tensor]
    done: int
    horizons: list[int]


@torch.no_grad()
def roll_out(model, context_BT: torch.Tensor, horizons: Sequence[int],
             lengths_B: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """{horizon: forecasts [B, horizon]} (fp32, de-normalised) after each row of `context_BT`; `lengths_B`: each
    row's real points are its last lengths_B[b] (None: all)."""
    from .modeling import KVCache

    if context_BT.dim() != 2 or context_BT.shape[1] == 0:
        raise ValueError(f"context must be [batch, time] with time > 0, got shape {tuple(context_BT.shape)}")
    horizons = sorted({int(h) for h in horizons})
    if not horizons or horizons[0] <= 0:
        raise ValueError(f"horizons must be positive, got {list(horizons)}")
    if model.config.input_size != 1:
        raise ValueError("forecasting handles univariate models (input_size=1)")
    param = next(model.parameters())
    B, T = context_BT.shape
    x_BT = context_BT.to(device=param.device, dtype=torch.float32)
    real_BT = None
    if lengths_B is not None:
        lengths_B = torch.as_tensor(lengths_B, device=param.device)
        if int(lengths_B.min()) < 1 or int(lengths_B.max()) > T:
            raise ValueError(f"lengths must be within 1..{T}, got {lengths_B.tolist()}")
        if int(lengths_B.min()) < T:
            real_BT = torch.arange(T, device=param.device) >= T - lengths_B[:, None]
    if real_BT is None:
        mean_B1 = x_BT.mean(dim=1, keepdim=True)
        std_B1 = x_BT.std(dim=1, keepdim=True, unbiased=False)
    else:
        x_BT = torch.where(real_BT, x_BT, 0.0)
        n_B1 = lengths_B[:, None].float()
        mean_B1 = x_BT.sum(dim=1, keepdim=True) / n_B1
        std_B1 = (torch.where(real_BT, x_BT - mean_B1, 0.0).square().sum(dim=1, keepdim=True) / n_B1).sqrt()
    std_B1 = torch.where(std_B1 > 1e-8, std_B1, torch.ones_like(std_B1))
    scaled_BT = (x_BT - mean_B1) / std_B1
    if real_BT is not None:
        scaled_BT = torch.where(real_BT, scaled_BT, 0.0)

    head_horizons = model.config.horizon_lengths
    out = {}
    cache = [KVCache(T + horizons[-1]) for _ in model.model.layers]
    branches = [_Branch(cache, scaled_BT.to(param.dtype), [], 0, horizons)]
    while branches:
        branch = branches.pop()
        mask_BS = None
        if real_BT is not None:  # every point after the context is real
            mask_BS = torch.cat([real_BT, real_BT.new_ones(B, branch.cache[0].length + branch.input_BT.shape[1] - T)],
                                dim=1)
        h_B1D, _ = model.model(branch.input_BT.unsqueeze(-1), kv_cache=branch.cache, last_only=True,
                               attention_mask_BS=mask_BS)
        by_head: dict[int, list[int]] = {}
        for h in branch.horizons:
            by_head.setdefault(head_schedule(h - branch.done, head_horizons)[0], []).append(h)
        going_on = []
        for j, hs in by_head.items():
            pred_Bh = model.lm_heads[j](h_B1D[:, -1]).float()
            chunks, done = branch.chunks + [pred_Bh], branch.done + pred_Bh.shape[1]
            if done in hs:
                out[done] = torch.cat(chunks, dim=1) * std_B1 + mean_B1
            rest = [h for h in hs if h > done]
            if rest:
                going_on.append(_Branch(None, pred_Bh.to(param.dtype), chunks, done, rest))
        for k, nxt in enumerate(going_on):  # copies taken now, before any branch extends the cache
            nxt.cache = branch.cache if k == 0 else [c.fork() for c in branch.cache]
        branches += going_on
    return {h: out[h] for h in horizons}
