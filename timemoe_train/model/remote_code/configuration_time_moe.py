"""Time-MoE configuration for `AutoConfig.from_pretrained(dir, trust_remote_code=True)`.

Shipped inside every export next to `config.json`; depends on transformers only (serving stacks load it without
timemoe-train installed). Works with transformers 4.40 and 5.x (a custom `__init__` keeps 5.x's dataclass
configs out of the way). Defaults are those of TimeMoE-50M.
"""

from transformers import PretrainedConfig


class TimeMoeConfig(PretrainedConfig):
    model_type = "time_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        input_size: int = 1,
        hidden_size: int = 384,
        intermediate_size: int = 1536,
        horizon_lengths=(1, 8, 32, 64),
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads=None,
        hidden_act: str = "silu",
        num_experts_per_tok: int = 2,
        num_experts: int = 8,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        use_dense: bool = False,
        rope_theta: float = 10000.0,
        attention_dropout: float = 0.0,
        apply_aux_loss: bool = True,
        router_aux_loss_factor: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.horizon_lengths = [horizon_lengths] if isinstance(horizon_lengths, int) else list(horizon_lengths)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.use_dense = use_dense
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.apply_aux_loss = apply_aux_loss
        self.router_aux_loss_factor = router_aux_loss_factor
        if hidden_act != "silu":
            raise ValueError(f"TimeMoeConfig.hidden_act={hidden_act!r}: only 'silu' is supported")
        if self.horizon_lengths[0] != 1 or sorted(set(self.horizon_lengths)) != self.horizon_lengths:
            raise ValueError(f"TimeMoeConfig.horizon_lengths={self.horizon_lengths!r}: must be strictly ascending "
                             "and start with 1 so that any horizon can be forecast")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # transformers 5.x drops tie_word_embeddings from the base config; the released config.json carries it.
        self.tie_word_embeddings = tie_word_embeddings
