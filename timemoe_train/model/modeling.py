"""Time-MoE: a decoder-only transformer over scalar time points, one token per point.

Module and parameter names are those of the released TimeMoE-50M/200M state dict, so weights move both ways
unchanged. Packed windows are supported: `sequence_ids_BT` numbers the sequences inside each row (-1 marks
padding); attention never crosses a sequence boundary and positions restart with every sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionLayout, attend, packed_positions, resolve_attn_impl
from .config import TimeMoeConfig
from .init import init_tensor_
from .moe import build_ffn

logger = logging.getLogger(__name__)


class TimeMoeInputEmbedding(nn.Module):
    """SwiGLU of the scalar value: silu(gate_layer(x)) * emb_layer(x)."""

    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.emb_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)
        self.gate_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)

    def forward(self, x_BTC):
        return F.silu(self.gate_layer(x_BTC)) * self.emb_layer(x_BTC)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # fp32 statistics: in bf16 the mean of squares loses the small values the series are normalised to.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] of the rotate-half RoPE, computed in fp32 from explicit positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim)
    angles_BTF = positions_BT.float().unsqueeze(-1) * inv_freq
    emb_BTd = torch.cat([angles_BTF, angles_BTF], dim=-1)
    return emb_BTd.cos().to(dtype).unsqueeze(1), emb_BTd.sin().to(dtype).unsqueeze(1)


def apply_rotary(x, cos, sin):
    """x [..., head_dim] with cos/sin broadcasting to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """One layer's keys and values [B, S, kv_heads, head_dim] over a whole roll-out, allocated at its final length
    on first use and filled in place: appending with torch.cat would copy every cached point again at each step."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k_BShd = self.v_BShd = None

    def append(self, k_BThd: torch.Tensor, v_BThd: torch.Tensor):
        B, T, h, d = k_BThd.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} points, {end} requested")
        if self.k_BShd is None:
            shape = (B, self.capacity, h, d)
            self.k_BShd, self.v_BShd = k_BThd.new_empty(shape), v_BThd.new_empty(shape)
        self.k_BShd[:, self.length:end] = k_BThd
        self.v_BShd[:, self.length:end] = v_BThd
        self.length = end
        return self.k_BShd[:, :end], self.v_BShd[:, :end]

    def fork(self) -> "KVCache":
        """A copy to extend on another branch of a roll-out (this one goes on unchanged)."""
        other = KVCache(self.capacity)
        other.length = self.length
        if self.k_BShd is not None:
            other.k_BShd, other.v_BShd = self.k_BShd.clone(), self.v_BShd.clone()
        return other


class TimeMoeAttention(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d, kv = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x_BTD, rope, layout: AttentionLayout, kv_cache: KVCache | None = None, last_only: bool = False):
        """rope: (cos, sin) [B, T, 1, head_dim]; kv_cache: the keys and values of the earlier points, extended in
        place; last_only: keys and values of every point (the cache needs them), the query of the last one alone."""
        B, T, _ = x_BTD.shape
        q_BTD, q_rope = (x_BTD[:, -1:], tuple(r[:, -1:] for r in rope)) if last_only else (x_BTD, rope)
        q_BThd = apply_rotary(self.q_proj(q_BTD).view(B, q_BTD.shape[1], self.num_heads, self.head_dim), *q_rope)
        k_BThd = apply_rotary(self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim), *rope)
        v_BThd = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)
        if kv_cache is not None:
            k_BThd, v_BThd = kv_cache.append(k_BThd, v_BThd)
        if last_only:  # the last point sees every key (of a left-padded row, every real one)
            layout = AttentionLayout("causal", past_len=k_BThd.shape[1] - 1) if layout.mask_B1TS is None else \
                AttentionLayout("dense_mask", k_BThd.shape[1] - 1, mask_B1TS=layout.mask_B1TS[:, :, -1:])
        out_BThd = attend(q_BThd, k_BThd, v_BThd, layout, self.dropout if self.training else 0.0)
        return self.o_proj(out_BThd.reshape(B, q_BThd.shape[1], -1))


class TimeMoeDecoderLayer(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.self_attn = TimeMoeAttention(config)
        self.ffn_layer = build_ffn(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h_BTD, rope, layout, kv_cache=None, last_only: bool = False):
        """last_only: the output of the last point alone, [B, 1, D] (forecasting reads nothing else)."""
        attn_BTD = self.self_attn(self.input_layernorm(h_BTD), rope, layout, kv_cache, last_only)
        h_BTD = (h_BTD[:, -1:] if last_only else h_BTD) + attn_BTD
        ffn_BTD, router_logits_NE = self.ffn_layer(self.post_attention_layernorm(h_BTD))
        return h_BTD + ffn_BTD, router_logits_NE


class TimeMoeModel(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.config = config
        self.embed_layer = TimeMoeInputEmbedding(config)
        self.layers = nn.ModuleList(TimeMoeDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._attn_impl: dict[str, str] = {}  # device type -> the attention path, resolved on first use
        if config.compile:
            # One graph per decoder block, as torchtitan does: the blocks share their code, so all of them reuse
            # the first one's compilation; the per-forward attention layout stays outside the compiled region.
            for layer in self.layers:
                layer.compile()

    def attn_impl(self, device: torch.device) -> str:
        if device.type not in self._attn_impl:
            impl = resolve_attn_impl(self.config.attn_impl, device)
            logger.info("attention path: %s (model.attn_impl=%s, device %s)", impl, self.config.attn_impl,
                        device.type)
            self._attn_impl[device.type] = impl
        return self._attn_impl[device.type]

    def forward(self, inputs_BTC, sequence_ids_BT=None, kv_cache: list[KVCache] | None = None,
                last_only: bool = False, attention_mask_BS=None):
        """kv_cache: one KVCache per layer, extended in place with the new points; last_only: the last layer and the
        final norm for the last point alone ([B, 1, D] out); attention_mask_BS: which of the cached and new points
        are real (rows left-padded to one length): positions count real points only, so a padded row computes
        what it would alone."""
        B, T, _ = inputs_BTC.shape
        device = inputs_BTC.device
        past_len = 0 if kv_cache is None else kv_cache[0].length
        if sequence_ids_BT is not None:
            if kv_cache is not None or attention_mask_BS is not None:
                raise ValueError("packed sequences (sequence_ids) cannot be combined with a KV cache or padding")
            positions_BT = packed_positions(sequence_ids_BT)
        elif attention_mask_BS is not None:
            positions_BT = (attention_mask_BS.long().cumsum(dim=1) - 1).clamp(min=0)[:, -T:]
        else:
            positions_BT = torch.arange(past_len, past_len + T, device=device).expand(B, T)
        layout = AttentionLayout.build(self.attn_impl(device), sequence_ids_BT, T, past_len, device) \
            if attention_mask_BS is None else AttentionLayout.padded(attention_mask_BS, T)

        h_BTD = self.embed_layer(inputs_BTC)
        cos, sin = rotary_cos_sin(positions_BT, self.config.head_dim, self.config.rope_theta, h_BTD.dtype)
        rope = (cos.transpose(1, 2), sin.transpose(1, 2))  # [B, T, 1, d]: broadcast over the heads
        router_logits = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if kv_cache is None else kv_cache[i]
            if self.config.gradient_checkpointing and self.training:
                h_BTD, logits_NE = checkpoint(layer, h_BTD, rope, layout, layer_cache, use_reentrant=False)
            else:
                h_BTD, logits_NE = layer(h_BTD, rope, layout, layer_cache, last_only and i == len(self.layers) - 1)
            router_logits.append(logits_NE)
        return self.norm(h_BTD), router_logits


class TimeMoeOutputLayer(nn.Module):
    def __init__(self, hidden_size: int, horizon: int, input_size: int):
        super().__init__()
        self.out_layer = nn.Linear(hidden_size, input_size * horizon, bias=False)

    def forward(self, h_BTD):
        return self.out_layer(h_BTD)


@dataclass
class TimeMoeOutput:
    loss: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None  # [num_heads]
    aux_loss: torch.Tensor | None = None
    predictions: list[torch.Tensor] | None = None  # per head [B, T, h * input_size]
    router_logits: list[torch.Tensor] | None = None  # per layer [B*T, E], batch-major


def horizon_targets(labels_BTC, loss_mask_BT, sequence_ids_BT, horizon: int):
    """Targets [B, T, h, C] of the head with horizon h and their validity [B, T, h].

    Head h at position t predicts labels[t : t+h] (points t+1 … t+h). A target is valid when it exists inside the
    window, its label is valid, and it belongs to the same sequence as position t.
    """
    B, T, C = labels_BTC.shape
    pad = horizon - 1
    targets_BThC = F.pad(labels_BTC, (0, 0, 0, pad)).unfold(1, horizon, 1).permute(0, 1, 3, 2)
    valid_BTh = F.pad(loss_mask_BT.bool(), (0, pad)).unfold(1, horizon, 1)
    if sequence_ids_BT is not None:
        ids_BTh = F.pad(sequence_ids_BT, (0, pad), value=-1).unfold(1, horizon, 1)
        valid_BTh = valid_BTh & (ids_BTh == sequence_ids_BT.unsqueeze(-1))
    return targets_BThC, valid_BTh


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask_N: torch.Tensor | None = None):
    """Switch-style balance loss over the logits of all layers at once: E * Σ_k Σ_e f[k, e] * P[e].

    The choices are counted by a scatter-add: `F.one_hot` would read its indices' range back to the host."""
    logits_NE = torch.cat(router_logits, dim=0).float()
    N, num_experts = logits_NE.shape
    probs_NE = torch.softmax(logits_NE, dim=-1)
    experts_KN = torch.topk(probs_NE, top_k, dim=-1).indices.T
    if token_mask_N is None:
        w_N, count = probs_NE.new_ones(N), N
    else:
        w_N = token_mask_N.float().repeat(len(router_logits))
        count = w_N.sum().clamp_min(1.0)
    f_KE = probs_NE.new_zeros(top_k, num_experts).scatter_add_(1, experts_KN, w_N.expand(top_k, N)) / count
    p_E = (probs_NE * w_N[:, None]).sum(0) / count
    return num_experts * (f_KE * p_E).sum()


class TimeMoeForPrediction(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.config = config
        self.model = TimeMoeModel(config)
        self.lm_heads = nn.ModuleList(
            TimeMoeOutputLayer(config.hidden_size, h, config.input_size) for h in config.horizon_lengths)
        with torch.no_grad():
            for name, p in self.named_parameters():
                init_tensor_(p, name, config)

    def forward(self, inputs_BT, labels_BT=None, loss_mask_BT=None, sequence_ids_BT=None) -> TimeMoeOutput:
        """inputs_BT: float values [B, T] (or [B, T, input_size]); labels_BT: the next points, labels[t] = x[t+1];
        loss_mask_BT: 1 where labels[t] is a real point of the same sequence as inputs[t];
        sequence_ids_BT: sequence number of each point inside its row, -1 for padding."""
        inputs_BTC = inputs_BT.unsqueeze(-1) if inputs_BT.dim() == 2 else inputs_BT
        h_BTD, router_logits = self.model(inputs_BTC, sequence_ids_BT)
        predictions = [head(h_BTD) for head in self.lm_heads]
        out = TimeMoeOutput(predictions=predictions, router_logits=router_logits)
        if labels_BT is None:
            return out

        labels_BTC = labels_BT.unsqueeze(-1) if labels_BT.dim() == 2 else labels_BT
        if loss_mask_BT is None:
            loss_mask_BT = torch.ones(labels_BTC.shape[:2], dtype=torch.bool, device=labels_BTC.device)
        head_losses = []
        for horizon, pred_BTX in zip(self.config.horizon_lengths, predictions):
            target_BThC, valid_BTh = horizon_targets(labels_BTC, loss_mask_BT, sequence_ids_BT, horizon)
            pred_BThC = pred_BTX.view(target_BThC.shape).float()
            huber_BThC = F.huber_loss(pred_BThC, target_BThC.float(), reduction="none", delta=self.config.huber_delta)
            valid_BThC = valid_BTh.unsqueeze(-1).expand_as(huber_BThC)
            head_losses.append((huber_BThC * valid_BThC).sum() / valid_BThC.sum().clamp_min(1))
        out.head_losses = torch.stack(head_losses)
        out.loss = out.head_losses.mean()
        if self._uses_timemoe_aux_loss():
            token_mask_N = None if sequence_ids_BT is None else (sequence_ids_BT >= 0).flatten()
            out.aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, token_mask_N)
            out.loss = out.loss + self.config.router_aux_loss_factor * out.aux_loss
        return out

    def _uses_timemoe_aux_loss(self) -> bool:
        c = self.config
        return c.apply_aux_loss and not c.use_dense and c.aux_loss_type == "timemoe"

    def forecast(self, context_BT: torch.Tensor, horizon: int, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast `horizon` points after each context row (`lengths_B`: rows left-padded, each holding its last
        lengths_B[b] points real): see `rollout.roll_out`, which also gives several horizons from one roll-out."""
        from .rollout import roll_out

        return roll_out(self, context_BT, [horizon], lengths_B)[horizon]

    # --- HF layout --------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        from .hf_layout import save_hf

        return save_hf(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **config_overrides) -> "TimeMoeForPrediction":
        from .hf_layout import load_hf

        return load_hf(cls, directory, **config_overrides)
