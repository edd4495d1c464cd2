"""The DeepSpeed engine around the train module: ZeRO config, AdamW parameter groups, the learning-rate schedule,
and an optimizer whose step can be vetoed (the non-finite guard) and that clips the gradients itself, on the device:
by the exact global norm where DeepSpeed's is not exact under expert parallelism (ZeRO-0), by the norm DeepSpeed's
ZeRO step computed otherwise (ZeRO-1/2, whose own clipping reads that norm back to the host once per group)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig


def learning_rate(step: int, cfg, max_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then a half cosine from `lr` to `min_lr` over `decay_steps` (default:
    the rest of the run), then `min_lr`; `step` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max_steps - cfg.warmup_steps if cfg.decay_steps is None else cfg.decay_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class SkippableStep:
    """Mixed into the optimizer class: while `veto` is set, `step()` does nothing (the trainer sets and clears it
    around a step it skips). Before stepping it clips to `clip_grad` (0: no clipping): with `exact_clipping` by the
    exact global gradient norm, kept in `last_norm`; under a ZeRO-1/2 `zero_optimizer` (which calls this step once
    per parameter group, its grads being this rank's flat partitions) by the global norm that one's step computed
    just before, unless DeepSpeed clips itself (a checkpoint from before restores its `clip_grad`)."""

    veto = False
    exact_clipping = False
    clip_grad = 0.0
    expert_group = None  # the group whose ranks hold different experts (EP); None: every rank holds them all
    zero_optimizer = None  # DeepSpeed's ZeRO-1/2 optimizer around this one
    last_norm: torch.Tensor | None = None  # on the device: read on logging steps only

    @torch.no_grad()
    def step(self, *args, **kwargs):
        if self.veto:
            return None
        if self.exact_clipping:
            self.last_norm = self._clip_by_global_norm()
        elif self.clip_grad > 0 and self.zero_optimizer is not None and self.zero_optimizer.clip_grad == 0:
            # A non-finite norm never gets here: DeepSpeed's step skips it before calling this one.
            self._clip(self._grads(), self.zero_optimizer._global_grad_norm)
        return super().step(*args, **kwargs)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _clip(self, grads: list[torch.Tensor], norm: torch.Tensor) -> None:
        """Scale by clip_grad / (norm + 1e-6) where that is below 1, as DeepSpeed's ZeRO does (the same
        operations, so the same bits), with no host read: the scale is applied also when it is 1. `norm` may be a
        float: DeepSpeed's bf16 optimizer gives one when the model has MoE layers (`get_norm_with_moe_layers`)."""
        scale = 1.0 / torch.clamp((torch.as_tensor(norm) + 1e-6) / self.clip_grad, min=1.0)
        for g in grads:
            g.mul_(scale.to(g.device))

    def _clip_by_global_norm(self) -> torch.Tensor:
        from deepspeed.moe.utils import is_moe_param

        dense, expert = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (expert if is_moe_param(p) else dense).append(p.grad)
        sq = torch.zeros(2, dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        for i, grads in enumerate((dense, expert)):
            if grads:
                sq[i] = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()
        if self.expert_group is not None:  # each EP rank holds other experts: their squares add up
            dist.all_reduce(sq[1:], group=self.expert_group)
        norm = sq.sum().sqrt()
        if self.clip_grad > 0:
            self._clip(dense + expert, norm)
        return norm


def _optimizer_class(base: type) -> type:
    return type(f"Skippable{base.__name__}", (SkippableStep, base), {})


def param_groups(module: nn.Module, cfg) -> list[dict]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or cfg.decay_1d else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for p in module.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def deepspeed_config(run: RunConfig, gas: int) -> dict:
    p, t = run.parallel, run.trainer
    # ZeRO-3: each checkpoint also holds the gathered weights, so that export needs neither DeepSpeed nor unpickling
    zero: dict = {"stage": p.zero_stage, "stage3_gather_16bit_weights_on_model_save": p.zero_stage == 3}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": run.optim.clip_grad if p.zero_stage == 3 else 0.0,  # else the optimizer clips
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if t.precision == "bf16":
        # DeepSpeed's bf16 default accumulates micro-batch gradients and all-reduces them in bf16 (8 bits of
        # mantissa): small gradients vanish against large ones. Both in fp32; the forward/backward stay bf16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def exact_clipping(run: RunConfig) -> bool:
    """ZeRO-0 in fp32 hands the optimizer whole, reduced gradients; DeepSpeed's own clip there averages per-rank
    norms, which under expert parallelism is not the global norm, so the optimizer clips instead."""
    return run.parallel.zero_stage == 0 and run.trainer.precision == "fp32"


def op_build_note(device: torch.device) -> str | None:
    """What `build_engine` is about to spend about a minute on, silently, when it does: on the CPU, DeepSpeed
    compiles its shared-memory collective op (a C++ extension) the first time, into torch's extension cache
    (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions); later runs load the built library. None otherwise."""
    if device.type != "cpu":
        return None
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME) or installed_ops.get(builder.name):
        return None
    built = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
    if built.is_file():
        return None
    return f"building DeepSpeed's CPU communication op into {built.parent} (once: later runs load it; about a minute)"


def build_engine(module: nn.Module, run: RunConfig, gas: int, expert_group):
    import deepspeed

    if next(module.parameters()).is_cuda:
        # fp32 matmuls (fp32 runs; the fp32 router and loss of bf16 ones) on the tensor cores, as TF32.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    o = run.optim
    if run.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        base, extra = DeepSpeedCPUAdam, {"adamw_mode": True}
    else:  # one fused kernel per parameter group: ~7x faster than the foreach path on CPU, fast on GPU too
        base, extra = torch.optim.AdamW, {"fused": True}
    optimizer = _optimizer_class(base)(param_groups(module, o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                       weight_decay=o.weight_decay, **extra)
    optimizer.exact_clipping = exact_clipping(run)
    optimizer.clip_grad, optimizer.expert_group = o.clip_grad, expert_group
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(run, gas),
                                      dist_init_required=False)
    if run.parallel.zero_stage in (1, 2):  # DeepSpeedZeroOptimizer, or BF16_Optimizer for bf16 ZeRO-1
        optimizer.zero_optimizer = engine.optimizer
    elif run.parallel.zero_stage == 0 and dist.get_world_size() == 1:
        # DeepSpeed all-reduces even alone: it would flatten every gradient into buckets and copy it back.
        engine.enable_backward_allreduce = False
    return engine, optimizer


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(engine, optimizer) -> torch.Tensor | float | None:
    """The step's gradient norm, left where it is (a device tensor is read on logging steps only)."""
    if optimizer.exact_clipping:
        return optimizer.last_norm
    return engine.get_global_grad_norm()
