"""Time-MoE for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Shipped inside every export next to `config.json` and `model.safetensors` (released TimeMoE-50M/200M names).
Depends on torch and transformers only: serving stacks load it without timemoe-train installed. It computes what
the released inference code computes (rotate-half RoPE, fp32 softmax and router, top-k not renormalised), equal
within float rounding, but faster: `scaled_dot_product_attention` with SDPA's own causal kernel for a context (no
mask in memory), q/k/v in one GEMM and one rotation, experts run sparsely on their own tokens sorted by expert,
RoPE computed once per forward, SwiGLU and residual sums in place when nothing backpropagates, and a roll-out fills
KV buffers allocated once for its whole length and computes the last layer and the head for the last point only.
It runs in the weights' dtype (bf16 on a GPU: `from_pretrained(dir, trust_remote_code=True, dtype=torch.bfloat16)`,
`torch_dtype=` under 4.40); `torch.compile` works per decoder layer (`for layer in model.model.layers:
layer.compile()`).
Runs with transformers 4.40 and 5.x: the public KV cache is a plain tuple of (key, value) per layer, the roll-out's
own buffers never leave `generate`, and RoPE is computed from positions on every call, so no transformers cache
class and no non-persistent buffer is involved.

Usage (users z-normalise each series over its context, or call `forecast`, which does it):
    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    out = model.generate(normed_context_BT, max_new_tokens=96)   # [B, T + 96]
    forecast_BH = model.forecast(context_BT, 96)                   # de-normalised
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_time_moe import TimeMoeConfig

KVCache = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]


class KVBuffer:
    """One layer's keys and values [B, kv_heads, S, head_dim] for a whole roll-out: allocated once at the roll-out's
    final length and filled in place (appending with torch.cat copies the whole cache again at every step)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.key = self.value = None

    def append(self, key, value):
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV buffer holds {self.capacity} points, {end} requested")
        if self.key is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.key, self.value = key.new_empty(shape), value.new_empty(shape)
        self.key[:, :, self.length:end] = key
        self.value[:, :, self.length:end] = value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]


def extend_cache(past, key, value):
    """The keys and values of the past points (None, a (key, value) tuple or a KVBuffer) and of the new ones."""
    if past is None:
        return key, value
    if isinstance(past, KVBuffer):
        return past.append(key, value)
    return torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)


def cached_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    first = past_key_values[0]
    return first.length if isinstance(first, KVBuffer) else first[0].shape[2]


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
        return swiglu(self.gate_layer(x), self.emb_layer(x))


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


def swiglu(gate, up):
    """silu(gate) * up; in place when no gradient will flow back through it (no temporaries to allocate)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


def rotary_cos_sin(position_ids, head_dim: int, base: float, dtype):
    """cos/sin of the rotate-half RoPE at explicit positions ([T] or [B, T] -> [..., T, 1, head_dim / 2]: one
    head's worth of angles, broadcast over the heads of [B, T, heads, head_dim]; both halves of a head share them),
    computed in fp32 once per forward for every layer, then cast to the activations' dtype."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    freqs = (position_ids.float()[..., None] * inv_freq).unsqueeze(-2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """x·cos + rotate_half(x)·sin, half by half: the released code's products and sums, without materialising
    rotate_half(x) or full-width cos/sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def repeat_kv(hidden_states, n_rep: int):
    """[B, kv_heads, S, d] -> [B, kv_heads * n_rep, S, d] for grouped-query attention (SDPA's own GQA needs a
    newer torch than the transformers 4.40 era brings)."""
    if n_rep == 1:
        return hidden_states
    b, kv_heads, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, kv_heads * n_rep, s, d)


@dataclass
class AttentionMask:
    """How the queries of one forward see the keys, shared by every layer: `causal` (no cache: SDPA's own causal
    kernel, no mask in memory), or `mask`, bool [T, S] (new points after a cache: lower-right causal) or additive
    [B, 1, T, S] (padding columns given, masked as the released code does), or neither (one query sees all)."""

    mask: Optional[torch.Tensor] = None
    causal: bool = False

    @classmethod
    def build(cls, attention_mask, batch_size: int, q_len: int, past_len: int, dtype, device):
        total = past_len + q_len
        if attention_mask is None:
            if q_len == 1:
                return cls()
            if past_len == 0:
                return cls(causal=True)
            return cls(torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len))
        if attention_mask.shape != (batch_size, total):
            raise ValueError(f"attention_mask must be [batch, past + time] = {(batch_size, total)}, "
                             f"got {tuple(attention_mask.shape)}")
        allowed = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)
        allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=device)
        return cls(torch.where(allowed, zero, torch.finfo(dtype).min))

    def last_row(self) -> "AttentionMask":
        """For the last query alone: it sees every key, except padding."""
        return AttentionMask(None if self.mask is None or self.mask.dim() == 2 else self.mask[..., -1:, :])


class TimeMoeMLP(nn.Module):
    """SwiGLU without biases: each routed expert, the shared expert and the dense FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TimeMoeSparseExpertsLayer(nn.Module):
    """Σ_topk p_i·expert_i(x) + sigmoid(shared_expert_gate(x))·shared_expert(x); top-k not renormalised.

    Sparse: the (token, choice) pairs are sorted by expert, so each expert runs one GEMM over a contiguous block
    of exactly its tokens; the block sizes are read once per layer (not once per expert), and the outputs return
    to their tokens through one permutation and one batched [1, K] x [K, D] product per token."""

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
        x_ND = hidden_states.reshape(-1, hidden_dim)
        router_logits = self.gate(x_ND)
        probs_NE = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights_NK, experts_NK = torch.topk(probs_NE, self.top_k, dim=-1)

        choices_M = experts_NK.flatten()
        order_M = torch.argsort(choices_M, stable=True)  # (token, choice) pairs grouped by expert
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E.scatter_add_(0, choices_M, torch.ones_like(choices_M))  # on the device, unlike bincount
        x_MD = x_ND[order_M // self.top_k]
        y_MD = torch.cat([expert(x_mD) for expert, x_mD in zip(self.experts, x_MD.split(counts_E.tolist()))])
        y_NKD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD).view(-1, self.top_k, hidden_dim)
        # The released code casts the routing weights to the activations' dtype before mixing.
        routed_ND = torch.bmm(weights_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1)

        out_ND = torch.addcmul(routed_ND, torch.sigmoid(self.shared_expert_gate(x_ND)), self.shared_expert(x_ND))
        return out_ND.view(batch_size, seq_len, hidden_dim), router_logits


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

    def forward(self, hidden_states, rope, mask: AttentionMask, past_key_value=None, last_only: bool = False):
        """rope: (cos, sin) broadcasting to [B, T, heads, head_dim / 2]; past_key_value: see `extend_cache`.
        last_only: keys and values of every point (the cache needs them), the query of the last point alone (all
        that a roll-out reads)."""
        bsz, q_len, _ = hidden_states.shape
        heads, kv_heads = self.num_heads, self.num_key_value_heads
        # q, k and v in one GEMM and one rotation; the weights keep their released names (concatenating them per
        # call costs a fraction of a percent of the GEMM itself).
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(hidden_states, weight, bias).view(bsz, q_len, heads + 2 * kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :, :heads + kv_heads], *rope)
        query, key, value = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]
        if last_only:
            query, mask = query[:, -1:], mask.last_row()
        key, value = extend_cache(past_key_value, key.transpose(1, 2), value.transpose(1, 2))
        present = (key, value)

        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        attn_output = F.scaled_dot_product_attention(
            query.transpose(1, 2), key, value, attn_mask=mask.mask, is_causal=mask.causal,
            dropout_p=self.attention_dropout if self.training else 0.0)
        attn_output = attn_output.transpose(1, 2).reshape(bsz, -1, self.hidden_size)
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

    def forward(self, hidden_states, rope, mask, past_key_value=None, last_only: bool = False):
        attn_out, present = self.self_attn(self.input_layernorm(hidden_states), rope, mask, past_key_value,
                                           last_only)
        if last_only:
            hidden_states = hidden_states[:, -1:]
        # Residual sums into the fresh outputs (a GEMM's output is not saved for backward: in place is safe).
        hidden_states = attn_out.add_(hidden_states)
        ffn_out = self.ffn_layer(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if isinstance(ffn_out, tuple):
            ffn_out, router_logits = ffn_out
        return ffn_out.add_(hidden_states), router_logits, present


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


class TimeMoeModel(TimeMoePreTrainedModel):
    def __init__(self, config: TimeMoeConfig):
        super().__init__(config)
        self.embed_layer = TimeMoeInputEmbedding(config)
        self.layers = nn.ModuleList(TimeMoeDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = TimeMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                last_only: bool = False):
        """last_only: the hidden state of the last point alone ([B, 1, D]; the cache still covers every point)."""
        if input_ids.dim() == 2:
            input_ids = input_ids.unsqueeze(-1)  # [B, T] values of a univariate series -> [B, T, 1]
        batch_size, seq_len, _ = input_ids.shape
        past_len = cached_length(past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache

        hidden_states = self.embed_layer(input_ids.to(self.embed_layer.emb_layer.weight.dtype))
        if position_ids is None:  # [T]: the same positions in every row
            position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device)
        cos, sin = rotary_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                  self.config.rope_theta, hidden_states.dtype)
        rope = (cos, sin)
        mask = AttentionMask.build(attention_mask, batch_size, seq_len, past_len, hidden_states.dtype,
                                   hidden_states.device)
        all_router_logits, next_cache = [], []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden_states, router_logits, present = layer(hidden_states, rope, mask, past,
                                                          last_only and i == len(self.layers) - 1)
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
        outputs, remaining = [], max_new_tokens
        cache = tuple(KVBuffer(inputs.shape[1] + max_new_tokens) for _ in self.model.layers)
        while remaining > 0:
            # Only the last point's output is read: the last layer and the head skip the others.
            hidden_states, _, _ = self.model(step, past_key_values=cache, use_cache=False, last_only=True)
            step = self.lm_heads[self.head_index(remaining)](hidden_states[:, -1])
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
