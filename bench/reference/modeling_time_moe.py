"""The reference the export's modeling code must beat and equal: what the released Time-MoE inference code computes,
computed its way (per-expert mask loop with `torch.where` + `index_add_`, eager attention with an additive causal
mask, RoPE recomputed in every layer, every head at every position of every roll-out step).

It was the export's own code until the fast one replaced it (timemoe_train/model/remote_code/); bench/forecast.py
times both on the same weights and tests/test_remote_code.py checks they agree, each loading it through
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` as the modeling file of a copied export.
Runs with transformers 4.40 and 5.x: the KV cache is a plain tuple of (key, value) per layer and RoPE is computed
from positions on every call, so no cache class and no non-persistent buffer is involved.

Usage (users z-normalise each series over its context, or call `forecast`, which does it):
    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    out = model.generate(normed_context_BT, max_new_tokens=96)   # [B, T + 96]
    forecast_BH = model.forecast(context_BT, 96)                   # de-normalised
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_time_moe import TimeMoeConfig

KVCache = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class TimeMoeOutputWithPast(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None  # the head picked by max_horizon_length, [B, T, h * input_size]
    predictions: Optional[Tuple[torch.FloatTensor, ...]] = None  # every head, ascending horizons
    # Named `cache`, not `past_key_values`: transformers 5.x renames that field on every ModelOutput.
    cache: Optional[KVCache] = None
    router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None  # per layer [B * T, E]


class TimeMoeInputEmbedding(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.emb_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)
        self.gate_layer = nn.Linear(config.input_size, config.hidden_size, bias=False)

    def forward(self, x):
        return F.silu(self.gate_layer(x)) * self.emb_layer(x)


class TimeMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TimeMoeRotaryEmbedding(nn.Module):
    """cos/sin of the rotate-half RoPE for explicit positions, in fp32, then cast to the activations' dtype."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def forward(self, position_ids, dtype):
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
        inv_freq = 1.0 / (self.base ** (exponent / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states, n_rep: int):
    """[B, kv_heads, S, d] -> [B, kv_heads * n_rep, S, d] for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    b, kv_heads, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads * n_rep, s, d)


class TimeMoeMLP(nn.Module):
    """SwiGLU without biases: each routed expert, the shared expert and the dense FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TimeMoeSparseExpertsLayer(nn.Module):
    """Σ_topk p_i·expert_i(x) + sigmoid(shared_expert_gate(x))·shared_expert(x); top-k not renormalised."""

    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        expert_size = config.intermediate_size // config.num_experts_per_tok
        self.experts = nn.ModuleList(TimeMoeMLP(config.hidden_size, expert_size) for _ in range(config.num_experts))
        self.shared_expert = TimeMoeMLP(config.hidden_size, config.intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states):
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights.to(hidden_states.dtype)

        final_hidden_states = torch.zeros_like(hidden_states)
        # [E, top_k, tokens]: which tokens picked expert e as their k-th choice.
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx, expert in enumerate(self.experts):
            choice, token = torch.where(expert_mask[expert_idx])
            if token.numel() == 0:
                continue
            expert_out = expert(hidden_states[token]) * routing_weights[token, choice, None]
            final_hidden_states.index_add_(0, token, expert_out.to(hidden_states.dtype))

        shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return (final_hidden_states + shared).view(batch_size, seq_len, hidden_dim), router_logits


class TimeMoeAttention(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        kv_dim = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=True)
        self.k_proj = nn.Linear(self.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(self.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.rotary_emb = TimeMoeRotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(self, hidden_states, attention_mask, position_ids, past_key_value=None):
        bsz, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary_emb(position_ids, query.dtype)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value)

        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        attn_weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_weights = F.dropout(attn_weights, p=self.attention_dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output), present


class TimeMoeDecoderLayer(nn.Module):
    def __init__(self, config: TimeMoeConfig):
        super().__init__()
        self.self_attn = TimeMoeAttention(config)
        if config.use_dense:
            self.ffn_layer = TimeMoeMLP(config.hidden_size, config.intermediate_size)
        else:
            self.ffn_layer = TimeMoeSparseExpertsLayer(config)
        self.input_layernorm = TimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = TimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask, position_ids, past_key_value=None):
        attn_out, present = self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids,
                                           past_key_value)
        hidden_states = hidden_states + attn_out
        ffn_out = self.ffn_layer(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if isinstance(ffn_out, tuple):
            ffn_out, router_logits = ffn_out
        return hidden_states + ffn_out, router_logits, present


class TimeMoePreTrainedModel(PreTrainedModel):
    config_class = TimeMoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TimeMoeDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        # Through the `nn.init` module attribute: transformers 5.x guards those calls so loaded weights stay put.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, TimeMoeRMSNorm):
            nn.init.ones_(module.weight)


def build_attention_mask(attention_mask, batch_size, q_len, past_len, dtype, device):
    """Additive mask [B, 1, T, past + T]: causal, offset by the cache, plus padding columns from a [B, S] 0/1 mask.
    A 0/1 mask that is already [B, 1, T, past + T] is taken as it is, causal part included, as the released code's
    `_prepare_4d_causal_attention_mask` takes one: how its users train on packed rows (a block-diagonal causal
    mask, positions restarting per piece)."""
    total = past_len + q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape != (batch_size, 1, q_len, total):
            raise ValueError(f"a 4D attention_mask must be [batch, 1, time, past + time] = "
                             f"{(batch_size, 1, q_len, total)}, got {tuple(attention_mask.shape)}")
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(attention_mask.bool(), zero, torch.finfo(dtype).min)
    allowed = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
    allowed = allowed[None, None].expand(batch_size, 1, q_len, total)
    if attention_mask is not None:
        if attention_mask.shape != (batch_size, total):
            raise ValueError(f"attention_mask must be [batch, past + time] = {(batch_size, total)}, "
                             f"got {tuple(attention_mask.shape)}")
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class TimeMoeModel(TimeMoePreTrainedModel):
    def __init__(self, config: TimeMoeConfig):
        super().__init__(config)
        self.embed_layer = TimeMoeInputEmbedding(config)
        self.layers = nn.ModuleList(TimeMoeDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = TimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        if input_ids.dim() == 2:
            input_ids = input_ids.unsqueeze(-1)  # [B, T] values of a univariate series -> [B, T, 1]
        batch_size, seq_len, _ = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand(batch_size, seq_len)

        hidden_states = self.embed_layer(input_ids.to(self.embed_layer.emb_layer.weight.dtype))
        mask = build_attention_mask(attention_mask, batch_size, seq_len, past_len, hidden_states.dtype,
                                    hidden_states.device)
        all_router_logits, next_cache = [], []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden_states, router_logits, present = layer(hidden_states, mask, position_ids, past)
            if router_logits is not None:
                all_router_logits.append(router_logits)
            next_cache.append(present)
        return self.norm(hidden_states), tuple(all_router_logits), (tuple(next_cache) if use_cache else None)


class TimeMoeOutputLayer(nn.Module):
    def __init__(self, hidden_size: int, horizon_length: int, input_size: int):
        super().__init__()
        self.out_layer = nn.Linear(hidden_size, input_size * horizon_length, bias=False)

    def forward(self, x):
        return self.out_layer(x)


def load_balancing_loss(router_logits: Tuple[torch.Tensor, ...], top_k: int, num_experts: int):
    """Switch-style balance over all layers' router logits concatenated: E · Σ_k Σ_e f[k, e]·P[e]."""
    routing_weights = F.softmax(torch.cat(router_logits, dim=0).float(), dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts).float()  # [N, K, E]
    tokens_per_expert = expert_mask.mean(dim=0)
    router_prob_per_expert = routing_weights.mean(dim=0)
    return num_experts * torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))


class TimeMoeForPrediction(TimeMoePreTrainedModel):
    def __init__(self, config: TimeMoeConfig):
        super().__init__(config)
        self.model = TimeMoeModel(config)
        self.lm_heads = nn.ModuleList(
            TimeMoeOutputLayer(config.hidden_size, h, config.input_size) for h in config.horizon_lengths)
        self.post_init()

    def head_index(self, max_horizon_length: Optional[int]) -> int:
        """The largest head whose horizon does not exceed max_horizon_length (the first head when None)."""
        if max_horizon_length is None:
            return 0
        return max(i for i, h in enumerate(self.config.horizon_lengths) if h <= max_horizon_length)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                loss_masks=None, use_cache=None, max_horizon_length=None, **kwargs):
        """input_ids: float values [B, T] (or [B, T, input_size]); labels[t] = x[t + 1], same shape;
        loss_masks: 1 where labels[t] counts. `logits` is the head picked by max_horizon_length.
        Other keyword arguments (return_dict, output_attentions, ... passed by HF pipelines and Trainer) are
        accepted and ignored."""
        hidden_states, router_logits, cache = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                                         use_cache)
        predictions = tuple(head(hidden_states) for head in self.lm_heads)
        loss = aux_loss = None
        if labels is not None:
            loss = sum(self.horizon_loss(pred, labels, loss_masks, h)
                       for pred, h in zip(predictions, self.config.horizon_lengths)) / len(predictions)
            if router_logits and self.config.apply_aux_loss:
                aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                               self.config.num_experts)
                loss = loss + self.config.router_aux_loss_factor * aux_loss
        return TimeMoeOutputWithPast(loss=loss, aux_loss=aux_loss, predictions=predictions, cache=cache,
                                     logits=predictions[self.head_index(max_horizon_length)],
                                     router_logits=router_logits)

    def horizon_loss(self, predictions, labels, loss_masks, horizon_length: int):
        """Huber loss of a head: at position t it predicts labels[t : t + h]; targets past the end are masked."""
        if labels.dim() == 2:
            labels = labels.unsqueeze(-1)
        batch_size, seq_len, input_size = labels.shape
        if loss_masks is None:
            loss_masks = torch.ones(batch_size, seq_len, dtype=predictions.dtype, device=predictions.device)
        pad = horizon_length - 1
        # [B, C, T + pad] -> windows [B, C, T, h] -> [B, T, h, C]
        shift_labels = F.pad(labels.transpose(1, 2), (0, pad)).unfold(-1, horizon_length, 1).permute(0, 2, 3, 1)
        shift_masks = F.pad(loss_masks.float(), (0, pad)).unfold(-1, horizon_length, 1).unsqueeze(-1)
        shift_masks = shift_masks.expand_as(shift_labels)
        shift_predictions = predictions.view(batch_size, seq_len, horizon_length, input_size).float()
        losses = F.huber_loss(shift_predictions, shift_labels.float(), reduction="none", delta=2.0)
        return (losses * shift_masks).sum() / shift_masks.sum().clamp_min(1.0)

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens: int):
        """Autoregressive roll-out on already-normalised values: [B, T] -> [B, T + max_new_tokens].

        Each step uses the largest head whose horizon does not exceed the points still needed and feeds all of its
        outputs back, reusing the KV cache (96 = 64 + 32; 720 = 11·64 + 8 + 8)."""
        if self.config.input_size != 1:
            raise ValueError("generate() handles univariate models (input_size=1)")
        if inputs.dim() != 2 or inputs.shape[1] == 0 or max_new_tokens <= 0:
            raise ValueError(f"need inputs [batch, time > 0] and max_new_tokens > 0, got shape "
                             f"{tuple(inputs.shape)} and {max_new_tokens}")
        dtype = self.model.embed_layer.emb_layer.weight.dtype
        step = inputs.to(self.device, dtype)
        outputs, remaining, cache = [], max_new_tokens, None
        while remaining > 0:
            out = self(step, past_key_values=cache, use_cache=True, max_horizon_length=remaining)
            step = out.logits[:, -1, :]
            cache = out.cache
            outputs.append(step.float())
            remaining -= step.shape[1]
        return torch.cat([inputs.to(self.device, torch.float32)] + outputs, dim=1)

    @torch.no_grad()
    def forecast(self, context, horizon: int):
        """Forecast `horizon` points after each row of context [B, T]: z-normalise each row over its context
        (population std; 1 where the row is constant), roll out with `generate`, de-normalise."""
        x = context.to(self.device, torch.float32)
        mean = x.mean(dim=1, keepdim=True)
        std = x.std(dim=1, keepdim=True, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        predictions = self.generate((x - mean) / std, max_new_tokens=horizon)[:, x.shape[1]:]
        return predictions * std + mean
