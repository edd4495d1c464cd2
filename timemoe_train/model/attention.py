"""Causal attention over packed rows, without a dense [B, T, T] mask where the device allows it.

A packed row holds several sequences (runs of one `sequence_ids` value; -1 runs are padding); a point attends to
the earlier points of its own run only. The dense mask compares ids instead of runs: the same where every id is one
run, as the loader writes them; where padding sits between pieces only the padding outputs differ, read by no loss. One path per run, `model.attn_impl`:

- `dense_mask`: SDPA with the block-diagonal causal mask [B, T, T]: the reference; costs T² per row and keeps
  SDPA off its flash kernels on GPUs.
- `causal`: SDPA with `is_causal=True` and no mask, for rows that hold one sequence each (`data.packing=false`):
  trailing padding then sees the sequence before it, which changes only padding outputs, read by no loss.
- `varlen`: the runs of the whole batch regrouped one per row, bucketed by length, causal SDPA per bucket without a
  mask, scattered back. Costs Σ len² instead of B·T²; forward and backward on any device (CPU training).
- `flex`: FlexAttention with a document block mask (CUDA; torch 2.13 has no CPU backward for it).
- `auto`: `flex` on CUDA, `varlen` elsewhere (train/config.py turns it into `causal` when data is not packed).

The layout (mask, bucket indices or block mask) is built once per forward and shared by every layer; with a KV
cache (forecasting) the new points see every cached one through a lower-right causal bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right



def resolve_attn_impl(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "flex" if device.type == "cuda" else "varlen"
    if requested == "flex" and device.type != "cuda" and torch.is_grad_enabled():
        raise ValueError(f"model.attn_impl='flex' on {device.type}: torch {torch.__version__} has no FlexAttention "
                         "backward there; use varlen (or auto)")
    return requested


def segment_starts(sequence_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: where a run of equal sequence ids begins (every row starts one)."""
    is_start_BT = torch.ones_like(sequence_ids_BT, dtype=torch.bool)
    is_start_BT[:, 1:] = sequence_ids_BT[:, 1:] != sequence_ids_BT[:, :-1]
    return is_start_BT


def packed_positions(sequence_ids_BT: torch.Tensor) -> torch.Tensor:
    """Positions that restart with every run of equal sequence ids."""
    T = sequence_ids_BT.shape[1]
    t_T = torch.arange(T, device=sequence_ids_BT.device)
    start_BT = torch.cummax(torch.where(segment_starts(sequence_ids_BT), t_T, 0), dim=1).values
    return t_T - start_BT


def block_causal_mask(sequence_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: same sequence id and not in the future (the `dense_mask` path)."""
    T = sequence_ids_BT.shape[1]
    same_BTS = sequence_ids_BT.unsqueeze(2) == sequence_ids_BT.unsqueeze(1)
    return same_BTS & torch.ones(T, T, dtype=torch.bool, device=sequence_ids_BT.device).tril()


def _bucket_length(n: int) -> int:
    """n rounded up to a quarter of its power-of-two octave (..., 8, 10, 12, 14, 16, 20, 24, ...): padding a run to
    its bucket costs at most 1.56x its own len², and a batch needs at most four SDPA calls per octave."""
    step = 1 << max((n - 1).bit_length() - 3, 0)
    return -(-n // step) * step


@dataclass
class VarlenBuckets:
    """The runs of a flattened [B*T] batch grouped by padded length. `index_RL[i]` are the flat positions of the
    runs of bucket i (one per row, clamped past a run's end: those keys come after every real query, so causal
    attention never reads them); `valid_RL[i]` marks the real ones; `inverse_N` puts the concatenated real outputs
    of all buckets back in batch order."""

    index_RL: list[torch.Tensor]
    valid_RL: list[torch.Tensor]
    inverse_N: torch.Tensor

    @classmethod
    def build(cls, sequence_ids_BT: torch.Tensor) -> "VarlenBuckets":
        device, N = sequence_ids_BT.device, sequence_ids_BT.numel()
        start_S = segment_starts(sequence_ids_BT).flatten().nonzero().squeeze(1)
        length_S = torch.diff(start_S, append=torch.tensor([N], device=device))
        # The one host sync of this path, once per forward: the bucket shapes.
        bucket_S = torch.tensor([_bucket_length(n) for n in length_S.tolist()], device=device)
        index_RL, valid_RL, order = [], [], []
        for L in torch.unique(bucket_S).tolist():
            runs = (bucket_S == L).nonzero().squeeze(1)
            offset_RL = torch.arange(L, device=device).unsqueeze(0)
            valid = offset_RL < length_S[runs].unsqueeze(1)
            index = (start_S[runs].unsqueeze(1) + offset_RL).clamp_max(N - 1)
            index_RL.append(index)
            valid_RL.append(valid)
            order.append(index[valid])
        order_N = torch.cat(order)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(N, device=device)
        return cls(index_RL, valid_RL, inverse_N)


def _flex_block_mask(sequence_ids_BT: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = sequence_ids_BT.shape
    run_BT = torch.cumsum(segment_starts(sequence_ids_BT), dim=1)  # run number: equal ids in two runs stay apart

    def document_causal(b, h, q, kv):
        return (run_BT[b, q] == run_BT[b, kv]) & (q >= kv)

    return create_block_mask(document_causal, B, None, T, T, device=sequence_ids_BT.device)


_compiled_flex = None


def _flex_attention(q_BhTd, k_BhTd, v_BhTd, block_mask, enable_gqa: bool):
    # Unfused (eager) FlexAttention materialises the scores; compiled it is one kernel.
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if q_BhTd.is_cuda else flex_attention
    return _compiled_flex(q_BhTd, k_BhTd, v_BhTd, block_mask=block_mask, enable_gqa=enable_gqa)


@dataclass
class AttentionLayout:
    """What every layer of one forward needs to attend: built by `build`, read by `attend`."""

    impl: str
    past_len: int = 0
    mask_B1TS: torch.Tensor | None = None  # dense_mask
    buckets: VarlenBuckets | None = None  # varlen
    block_mask: object = None  # flex

    @classmethod
    def build(cls, impl: str, sequence_ids_BT: torch.Tensor | None, T: int, past_len: int, device) -> "AttentionLayout":
        if sequence_ids_BT is None:  # one sequence per row, possibly after a KV cache
            if impl == "dense_mask" and past_len:
                mask_TS = torch.ones(T, past_len + T, dtype=torch.bool, device=device).tril(past_len)
                return cls(impl, past_len, mask_B1TS=mask_TS[None, None])
            return cls("causal", past_len)
        if impl == "dense_mask":
            return cls(impl, mask_B1TS=block_causal_mask(sequence_ids_BT).unsqueeze(1))
        if impl == "varlen":
            return cls(impl, buckets=VarlenBuckets.build(sequence_ids_BT))
        if impl == "flex":
            return cls(impl, block_mask=_flex_block_mask(sequence_ids_BT))
        return cls("causal")


def attend(q_BThd: torch.Tensor, k_BShd: torch.Tensor, v_BShd: torch.Tensor, layout: AttentionLayout,
           dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention of [B, T, heads, d] queries over [B, S, kv_heads, d] keys/values (S = cached +
    T); returns [B, T, heads, d]."""
    gqa = q_BThd.shape[2] != k_BShd.shape[2]
    if layout.impl == "varlen":
        return _varlen(q_BThd, k_BShd, v_BShd, layout.buckets, dropout_p, gqa)
    q, k, v = (x.transpose(1, 2) for x in (q_BThd, k_BShd, v_BShd))
    if layout.impl == "flex":
        out = _flex_attention(q, k, v, layout.block_mask, gqa)
    elif layout.impl == "causal" and layout.past_len and q.shape[2] > 1:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                             dropout_p=dropout_p, enable_gqa=gqa)
    else:  # a single new point after a cache sees everything: no mask either
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask_B1TS, dropout_p=dropout_p,
                                             is_causal=layout.impl == "causal" and not layout.past_len,
                                             enable_gqa=gqa)
    return out.transpose(1, 2)


def _varlen(q_BThd, k_BThd, v_BThd, buckets: VarlenBuckets, dropout_p: float, gqa: bool):
    B, T, h, d = q_BThd.shape
    q_N, k_N, v_N = (x.reshape(B * T, x.shape[2], d) for x in (q_BThd, k_BThd, v_BThd))
    outs = []
    for index_RL, valid_RL in zip(buckets.index_RL, buckets.valid_RL):
        q, k, v = (x[index_RL].transpose(1, 2) for x in (q_N, k_N, v_N))  # [R, heads, L, d]
        out_RLhd = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                  enable_gqa=gqa).transpose(1, 2)
        outs.append(out_RLhd[valid_RL])
    return torch.cat(outs)[buckets.inverse_N].view(B, T, h, d)
