"""TimeMoeConfig: the architecture's hyper-parameters, read from and written to HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# Keys of the released `config.json`, in its order. Everything else on the dataclass is a training-time choice
# (which MoE implementation runs, how the aux loss is computed) and does not belong to the weights.
HF_CONFIG_KEYS = (
    "input_size", "hidden_size", "intermediate_size", "horizon_lengths", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "num_experts_per_tok", "num_experts",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "use_dense", "rope_theta",
    "attention_dropout", "apply_aux_loss", "router_aux_loss_factor", "tie_word_embeddings",
)
MOE_IMPLS = ("native", "megatron")
EXPERT_GEMMS = ("auto", "grouped_mm", "loop")  # see model/moe.py
ATTN_IMPLS = ("auto", "dense_mask", "causal", "varlen", "flex")  # see model/attention.py
AUX_LOSS_TYPES = ("timemoe", "megatron")


class ConfigError(ValueError):
    pass


@dataclass
class TimeMoeConfig:
    input_size: int = 1
    hidden_size: int = 384
    intermediate_size: int = 1536
    horizon_lengths: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    num_experts_per_tok: int = 2
    num_experts: int = 8
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    use_dense: bool = False
    rope_theta: float = 10000.0
    attention_dropout: float = 0.0
    apply_aux_loss: bool = True
    router_aux_loss_factor: float = 0.02
    tie_word_embeddings: bool = False
    # Training-time choices, not written to config.json.
    moe_impl: str = "native"
    # "timemoe": the released models' Switch-style balance loss over all layers' router logits at once. "megatron": megatron-core's own balancing
    # (type/coeff below), only with moe_impl="megatron".
    aux_loss_type: str = "timemoe"
    megatron_load_balancing_type: str = "aux_loss"
    megatron_z_loss_coeff: float | None = None
    megatron_expert_bias: bool = False
    huber_delta: float = 2.0
    # Std of the input embedding's two [H, 1] weights at initialisation; None: initializer_range, as the released
    # code. The embedding reads one scalar (fan-in 1): at 0.02 it starts as ~1e-4·x², even in x, so the model
    # cannot tell a rise from a fall until those weights grow (the first ~200 steps of the demo). 1.0 is fan-in
    # scale.
    embed_init_std: float | None = None
    gradient_checkpointing: bool = False
    # How packed rows attend (model/attention.py): auto = flex on CUDA, varlen elsewhere.
    attn_impl: str = "auto"
    compile: bool = False  # torch.compile each decoder block
    # Native MoE experts: auto = torch._grouped_mm where it has a fast kernel (bf16 on SM90+, CPU), else a loop.
    expert_gemm: str = "auto"
    # moe_impl=megatron only: TransformerEngine's grouped experts (CUDA + TE installed). Changes the expert
    # parameters' layout, so it is a choice, never inferred from what is installed.
    megatron_use_te: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.horizon_lengths = list(self.horizon_lengths)
        self.validate()

    @property
    def expert_intermediate_size(self) -> int:
        return self.intermediate_size // self.num_experts_per_tok

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def active_params_per_token(self) -> int:
        """Weights one time point is multiplied with (top-k experts, not all): the N of a 6·N FLOP estimate and
        the "activated parameters" of the paper's tables."""
        kv = self.num_key_value_heads * self.head_dim
        attention = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * kv
        if self.use_dense:
            ffn = 3 * self.hidden_size * self.intermediate_size
        else:
            ffn = (self.hidden_size * self.num_experts  # router
                   + self.num_experts_per_tok * 3 * self.hidden_size * self.expert_intermediate_size
                   + 3 * self.hidden_size * self.intermediate_size + self.hidden_size)  # shared expert and its gate
        embed = 2 * self.input_size * self.hidden_size
        heads = self.hidden_size * self.input_size * sum(self.horizon_lengths)
        return embed + self.num_hidden_layers * (attention + ffn) + heads

    def validate(self) -> None:
        def bad(field_name, value, why):
            raise ConfigError(f"TimeMoeConfig.{field_name}={value!r}: {why}")

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_experts", "num_experts_per_tok", "input_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                bad(name, getattr(self, name), "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", self.hidden_size, f"not divisible by num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("hidden_size", self.hidden_size, f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", self.num_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", self.num_experts_per_tok, f"exceeds num_experts={self.num_experts}")
        if not self.use_dense and self.intermediate_size % self.num_experts_per_tok:
            bad("intermediate_size", self.intermediate_size,
                f"not divisible by num_experts_per_tok={self.num_experts_per_tok}")
        hl = self.horizon_lengths
        if not hl or any(int(h) <= 0 for h in hl):
            bad("horizon_lengths", hl, "must be a non-empty list of positive integers")
        if any(a >= b for a, b in zip(hl, hl[1:])):
            bad("horizon_lengths", hl, "must be strictly ascending")
        if hl[0] != 1:
            bad("horizon_lengths", hl, "must start with 1 so that any horizon can be forecast")
        if self.hidden_act != "silu":
            bad("hidden_act", self.hidden_act, "only 'silu' is supported (the released models use it)")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", self.moe_impl, f"choose one of {MOE_IMPLS}")
        if self.attn_impl not in ATTN_IMPLS:
            bad("attn_impl", self.attn_impl, f"choose one of {ATTN_IMPLS}")
        if self.attn_impl == "flex" and self.attention_dropout:
            bad("attn_impl", self.attn_impl, f"FlexAttention has no dropout (attention_dropout="
                f"{self.attention_dropout}); use varlen or dense_mask")
        if self.embed_init_std is not None and not self.embed_init_std > 0:
            bad("embed_init_std", self.embed_init_std, "must be > 0 (or null for initializer_range)")
        if self.expert_gemm not in EXPERT_GEMMS:
            bad("expert_gemm", self.expert_gemm, f"choose one of {EXPERT_GEMMS}")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            bad("aux_loss_type", self.aux_loss_type, f"choose one of {AUX_LOSS_TYPES}")
        if self.aux_loss_type == "megatron" and self.moe_impl != "megatron":
            bad("aux_loss_type", self.aux_loss_type, "megatron's balancing needs moe_impl='megatron'")

    # --- HF config.json -------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = {k: getattr(self, k) for k in HF_CONFIG_KEYS}
        d.update(
            model_type="time_moe",
            architectures=["TimeMoeForPrediction"],
            auto_map={
                "AutoConfig": "configuration_time_moe.TimeMoeConfig",
                "AutoModelForCausalLM": "modeling_time_moe.TimeMoeForPrediction",
            },
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config", **overrides) -> "TimeMoeConfig":
        if d.get("model_type", "time_moe") != "time_moe":
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r}, expected 'time_moe'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in HF_CONFIG_KEYS}
        for k, v in overrides.items():
            if k not in known:
                raise ConfigError(f"{source}: unknown TimeMoeConfig field {k!r}")
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path, **overrides) -> "TimeMoeConfig":
        path = Path(directory) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json in this directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TimeMoeConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # Small enough for multi-process CPU tests, yet every feature is exercised (GQA off, 4 experts, top-2).
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096),
    "base": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "ultra": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=36, num_attention_heads=16),
}
