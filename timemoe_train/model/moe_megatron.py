"""The Time-MoE feed-forward block on megatron-core's MoELayer (`moe_impl: megatron`), for expert parallelism.

Same maths as `moe.TimeMoeSparseExpertsLayer` (softmax over all experts in fp32, top-k without renormalising,
SwiGLU experts, sigmoid-gated shared expert, dropless), same interface: `forward(x_BTD) -> (y_BTD, logits_NE)`.
Only the parameter names differ; `state_dict_adapter` maps them to the released ones.

One program for every device; the expert kernels follow `model.megatron_use_te`: a `SequentialMLP` by default,
TE's grouped GEMM (`TEGroupedMLP`) when switched on (CUDA with TransformerEngine; an error otherwise).

Aux loss (`config.aux_loss_type`):
- "timemoe": megatron's balancing is off; the model computes the released models' balance loss from the
  returned logits.
- "megatron": megatron's `megatron_load_balancing_type` (coefficient `router_aux_loss_factor`, applied per
  layer as megatron does) and z-loss (`megatron_z_loss_coeff`) are attached to the router outputs through
  `MoEAuxLossAutoScaler`, so they reach the gradient without being added to the returned loss. With gradient
  accumulation call `set_aux_loss_scale(num_microbatches)`; log with `finish_megatron_step(model)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import ConfigError, TimeMoeConfig

_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def uses_te_grouped_experts(config: TimeMoeConfig) -> bool:
    """Whether this model's megatron blocks run their experts as TE grouped GEMMs (`model.megatron_use_te`) or as
    a SequentialMLP. The state-dict adapter reads this too: the two layouts name the expert weights differently,
    so it is the config's choice, never what happens to be installed."""
    if not config.megatron_use_te:
        return False
    if not torch.cuda.is_available():
        raise ConfigError("TimeMoeConfig.megatron_use_te=True: TransformerEngine's grouped experts need a CUDA GPU")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise ConfigError("TimeMoeConfig.megatron_use_te=True: transformer_engine is not installed "
                          "(pip install 'timemoe-train[gpu]')") from None
    return True


def transformer_config(config: TimeMoeConfig) -> TransformerConfig:
    """The megatron settings that reproduce the Time-MoE MoE layer: softmax scores over all experts before the top-k
    and no renormalisation, SwiGLU experts, a sigmoid-gated shared expert, no token dropping."""
    megatron_aux = config.aux_loss_type == "megatron"
    balancing = config.megatron_load_balancing_type if megatron_aux else "none"
    if megatron_aux and config.megatron_expert_bias:
        raise ConfigError(
            "TimeMoeConfig.megatron_expert_bias=True: megatron-core 0.16.1 supports expert bias only with sigmoid "
            "router scores renormalised over the top-k, while Time-MoE routes with softmax scores kept as they are; "
            "turning it on would train a different model than the exported one serves")
    aux_coeff = config.router_aux_loss_factor if (
        megatron_aux and config.apply_aux_loss and balancing in _AUX_LOSS_TYPES) else 0.0
    grouped = uses_te_grouped_experts(config)

    def init_normal(w):
        return nn.init.normal_(w, mean=0.0, std=config.initializer_range)

    return TransformerConfig(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.intermediate_size,
        num_moe_experts=config.num_experts,
        moe_router_topk=config.num_experts_per_tok,
        moe_ffn_hidden_size=config.expert_intermediate_size,
        moe_shared_expert_intermediate_size=config.intermediate_size,
        moe_shared_expert_gate=True,
        moe_shared_expert_overlap=False,
        # softmax over all experts, then top-k, no renormalisation, in fp32
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,
        moe_router_topk_scaling_factor=None,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=aux_coeff,
        moe_z_loss_coeff=config.megatron_z_loss_coeff if megatron_aux else None,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        # Built on CPU like the rest of the model, then moved with `.to(device)`.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        init_method=init_normal,
        output_layer_init_method=init_normal,
    )


class _LogitsRouter(TopKRouter):
    """megatron's top-k router that keeps its fp32 logits [S, B, E] for the caller (they are in the graph)."""

    def gating(self, input):
        logits = super().gating(input)
        if logits.requires_grad:
            # Our batch-major copy sends back a transposed gradient; megatron's GEMM backward `.view`s it.
            logits.register_hook(torch.Tensor.contiguous)
        self.last_logits = logits
        return logits


class MegatronMoELayer(MoELayer):
    """megatron-core's MoELayer with Time-MoE's routing and experts; interface of `moe.build_ffn` blocks.

    Needs megatron's parallel groups, which it never creates itself: `timemoe_train.parallel.init_parallel()`
    first (in one plain process too: it then builds a one-process layout)."""

    def __init__(self, config: TimeMoeConfig):
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("moe_impl='megatron' needs megatron's parallel groups: call "
                               "timemoe_train.parallel.init_parallel() first (or load the model with moe_impl='native')")
        te = uses_te_grouped_experts(config)
        spec = get_moe_module_spec(use_te=te, num_experts=config.num_experts, moe_grouped_gemm=te)
        spec.submodules.router = _LogitsRouter
        super().__init__(transformer_config(config), submodules=spec.submodules)
        # One tracker slot for every layer: build_ffn does not know the layer index. finish_megatron_step divides
        # the sum by the number of layers, which is the per-layer mean megatron itself logs.
        self.set_layer_number(1)
        self.register_state_dict_post_hook(drop_extra_state)
        self.register_load_state_dict_post_hook(_ignore_missing_extra_state)

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing replays us in backward
        if recomputing:  # the first pass already logged this layer's aux losses
            self.router.layer_number = None
        try:
            y_TBD, _ = super().forward(x_BTD.transpose(0, 1).contiguous())
        finally:
            self.router.layer_number = 1
        logits_TBE, self.router.last_logits = self.router.last_logits, None
        logits_NE = logits_TBE.view(T, B, -1).transpose(0, 1).reshape(B * T, -1)
        return y_TBD.transpose(0, 1), logits_NE


def drop_extra_state(module, state_dict, prefix, local_metadata):
    """A state-dict hook: megatron's linear layers save an `_extra_state` (None; TE's fp8 metadata, empty without
    fp8), for which the released layout and DeepSpeed's per-expert files have no place."""
    for key in [k for k in state_dict if k.endswith("._extra_state")]:
        del state_dict[key]


def _ignore_missing_extra_state(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.endswith("._extra_state")]


def set_aux_loss_scale(num_microbatches: int) -> None:
    """Scale megatron's aux/z-loss gradients like the main loss under gradient accumulation (megatron's own
    schedule does this): call once before the micro-batches of a step when the loss is divided by their number."""
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_microbatches))


def finish_megatron_step(model: nn.Module, num_microbatches: int = 1) -> dict[str, float]:
    """Megatron's tracked aux losses of the step just run — {"load_balancing_loss": …, "z_loss": …}, each the
    mean over layers and micro-batches, averaged over data-parallel ranks — then clears the tracker and the
    per-global-batch state of "global_aux_loss". A collective: every rank calls it once per optimizer step.
    Empty while no megatron aux loss has been tracked in this process (`aux_loss_type` "timemoe")."""
    layers = [m for m in model.modules() if isinstance(m, MegatronMoELayer)]
    for layer in layers:
        layer.router.reset_global_aux_loss_tracker()
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not layers or not tracker:
        return {}
    names = sorted(tracker)
    sums = torch.stack([tracker[name]["values"].sum() for name in names]).float()
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
        sums /= dist.get_world_size(dp_group)
    moe_utils.clear_aux_losses_tracker()
    return dict(zip(names, (sums / (len(layers) * num_microbatches)).tolist()))
