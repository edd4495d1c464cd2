"""Causal attention over packed rows, without a dense [B, T, T] mask where the device allows it.

A packed row holds several sequences (runs of one `sequence_ids` value; -1 runs are padding); a point attends to
the earlier points of its own run only. The dense mask compares ids instead of runs: the same where every id is one
run, as the loader writes them; where padding sits between pieces only the padding outputs differ, read by no loss. One path per run, `model.attn_impl`:

- `dense_mask`: SDPA with the block-diagonal causal mask [B, T, T]: the reference; costs T² per row and keeps
  SDPA off its flash kernels on GPUs.
- `causal`: SDPA with `is_causal=True` and no mask, for rows that hold one sequence each (`data.packing=false`):
  trailing padding then sees the sequence before it, which changes only padding outputs, read by no loss.
- `varlen`: the runs of the whole batch regrouped one per row, bucketed by length, causal SDPA per bucket without a
  mask, scattered back. Costs Σ len² instead of B·T²; forward and backward on any device (CPU training). The
  bucketing reads the run lengths on the host (about 3 + 2 per bucket syncs per forward, bench/host_syncs.py): fine
  on CPU, where there is no queue to drain; the GPU paths (`flex`, `dense_mask`, `causal`) read nothing back.
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
    """The runs of a flattened [B*T] batch, one per row, grouped into buckets of equal padded length and laid end
    to end: `index_P` holds the flat position of every padded slot (a slot past its run's end repeats the run's
    last position: causal attention lets no real query see it), `shapes` the (runs, length) of each bucket, and
    `source_N` the slot of every flat position, where its output is read back. One gather in, one gather out."""

    index_P: torch.Tensor
    shapes: list[tuple[int, int]]
    source_N: torch.Tensor

    @classmethod
    def build(cls, start_S: torch.Tensor, N: int) -> "VarlenBuckets":
        device = start_S.device
        length_S = torch.diff(start_S, append=torch.tensor([N], device=device))
        # The one host sync of this path, once per forward: the bucket shapes.
        bucket_S = torch.tensor([_bucket_length(n) for n in length_S.tolist()], device=device)
        index, shapes = [], []
        source_N = torch.empty(N, dtype=torch.long, device=device)
        slots = 0
        for L in torch.unique(bucket_S).tolist():
            runs = (bucket_S == L).nonzero().squeeze(1)
            offset_RL = torch.arange(L, device=device).unsqueeze(0)
            last_R1 = (start_S[runs] + length_S[runs] - 1).unsqueeze(1)
            index_RL = torch.minimum(start_S[runs].unsqueeze(1) + offset_RL, last_R1)
            slot_RL = slots + torch.arange(len(runs) * L, device=device).view(len(runs), L)
            valid_RL = offset_RL < length_S[runs].unsqueeze(1)
            source_N[index_RL[valid_RL]] = slot_RL[valid_RL]
            index.append(index_RL.flatten())
            shapes.append((len(runs), L))
            slots += len(runs) * L
        return cls(torch.cat(index), shapes, source_N)


def _flex_block_mask(sequence_ids_BT: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = sequence_ids_BT.shape
    run_BT = torch.cumsum(segment_starts(sequence_ids_BT), dim=1)  # run number: equal ids in two runs stay apart

    def document_causal(b, h, q, kv):
        return (run_BT[b, q] == run_BT[b, kv]) & (q >= kv)

    # Compiled on CUDA, the mask is evaluated block by block; eager it fills a [B, T, T] grid first.
    return create_block_mask(document_causal, B, None, T, T, device=sequence_ids_BT.device,
                             _compile=sequence_ids_BT.is_cuda)


_compiled_flex = None


def _flex_attention(q_BhTd, k_BhTd, v_BhTd, block_mask, enable_gqa: bool):
    # Unfused (eager) FlexAttention materialises the scores; compiled it is one kernel.
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside a compiled block (model.compile): dynamo fuses it there
        return flex_attention(q_BhTd, k_BhTd, v_BhTd, block_mask=block_mask, enable_gqa=enable_gqa)
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
            start_S = segment_starts(sequence_ids_BT).flatten().nonzero().squeeze(1)
            if len(start_S) == sequence_ids_BT.shape[0]:  # every row one run: nothing to regroup
                return cls("causal")
            return cls(impl, buckets=VarlenBuckets.build(start_S, sequence_ids_BT.numel()))
        if impl == "flex":
            return cls(impl, block_mask=_flex_block_mask(sequence_ids_BT))
        return cls("causal")

    @classmethod
    def padded(cls, attention_mask_BS: torch.Tensor, T: int) -> "AttentionLayout":
        """The last T of S points (S - T of them cached) over left-padded rows: a point sees the real points up to
        itself, and itself (a padding point that saw nothing would turn its output, and through its value every
        later one, into NaN)."""
        S, device = attention_mask_BS.shape[1], attention_mask_BS.device
        key_S, query_T1 = torch.arange(S, device=device), torch.arange(S - T, S, device=device)[:, None]
        mask_BTS = (key_S <= query_T1) & (attention_mask_BS.bool().unsqueeze(1) | (key_S == query_T1))
        return cls("dense_mask", S - T, mask_B1TS=mask_BTS.unsqueeze(1))


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


@torch.compiler.disable  # bucket shapes change with every batch: eager, between the compiled parts of a block
def _varlen(q_BThd, k_BThd, v_BThd, buckets: VarlenBuckets, dropout_p: float, gqa: bool):
    B, T, h, d = q_BThd.shape
    sizes = [R * L for R, L in buckets.shapes]
    q_P, k_P, v_P = (x.reshape(B * T, x.shape[2], d)[buckets.index_P].split(sizes) for x in (q_BThd, k_BThd, v_BThd))
    outs = []
    for (R, L), q, k, v in zip(buckets.shapes, q_P, k_P, v_P):
        q, k, v = (x.view(R, L, x.shape[1], d).transpose(1, 2) for x in (q, k, v))  # [R, heads, L, d]
        out_RhLd = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        outs.append(out_RhLd.transpose(1, 2).reshape(R * L, h, d))
    return torch.cat(outs)[buckets.source_N].view(B, T, h, d)
