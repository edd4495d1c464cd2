"""The engine's full fp32 weights, Adam moments and step count under the released names, out of it and into it,
for the elastic part of a checkpoint (`timemoe_train.checkpoint.elastic`).

Through DeepSpeed's public accessors (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state` and their
setters), which assemble a parameter from, and scatter it over, any ZeRO 1/2 (or bf16) partitioning; reading is
a collective over the parameter's data-parallel group (the expert-data-parallel one for experts), so every rank
walks the parameters in the same order. ZeRO-0 in fp32 keeps no master copy: there the parameter and the torch
optimizer's own state are the full tensors.
"""

from __future__ import annotations

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from ..checkpoint import CheckpointError
from ..checkpoint.elastic import MODEL, MOMENTS, OPTIMIZER_STEP
from ..model.hf_layout import released_view


def _has_master(p: torch.Tensor) -> bool:
    """DeepSpeed keeps this parameter's fp32 copy and moments in its partitions (ZeRO 1/2, bf16)."""
    return hasattr(p, "_hp_mapping")


def adam_step(optimizer: torch.optim.Optimizer) -> float:
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) != 1:
        raise RuntimeError(f"optimizer step counts {sorted(steps)}: expected one value for every parameter")
    return steps.pop()


def engine_state(engine, model, ep_rank: int, ep_size: int) -> dict:
    """Collective: this rank's entries of the elastic checkpoint (views of fresh full tensors)."""
    weights, moments = {}, {k: {} for k in MOMENTS}
    _link_optimizer_state(engine)
    for name, p in model.named_parameters():
        if _has_master(p):
            weights[name] = safe_get_full_fp32_param(p)
            for k in MOMENTS:
                moments[k][name] = safe_get_full_optimizer_state(p, k)
        else:
            weights[name] = p.detach().float()
            for k in MOMENTS:
                moments[k][name] = engine.basic_optimizer.state[p][k].detach().float()
    state = {MODEL: released_view(model, weights, ep_rank, ep_size)}
    for k in MOMENTS:
        state[k] = released_view(model, moments[k], ep_rank, ep_size)
    state[OPTIMIZER_STEP] = torch.tensor(adam_step(engine.basic_optimizer), dtype=torch.float64)
    return state


def load_engine_state(engine, model, ep_rank: int, ep_size: int, read) -> None:
    """`read(state)` fills the released-name entries this rank needs; they go into the module's parameters, the
    master copies and the optimizer state of a freshly built engine (any ZeRO stage 0-2, any layout)."""
    params = dict(model.named_parameters())
    weights = {n: torch.empty(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    moments = {k: {n: torch.empty_like(w) for n, w in weights.items()} for k in MOMENTS}
    state = {MODEL: released_view(model, weights, ep_rank, ep_size),
             **{k: released_view(model, moments[k], ep_rank, ep_size) for k in MOMENTS},
             OPTIMIZER_STEP: torch.zeros((), dtype=torch.float64)}
    read(state)
    _seed_optimizer_state(engine, float(state[OPTIMIZER_STEP]))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])  # the module's own copy (bf16 in a bf16 run), full on every rank at ZeRO <= 2
            if _has_master(p):
                safe_set_full_fp32_param(p, weights[name])
                for k in MOMENTS:
                    safe_set_full_optimizer_state(p, moments[k][name], k)
            else:
                for k in MOMENTS:
                    engine.basic_optimizer.state[p][k].copy_(moments[k][name])


def _seed_optimizer_state(engine, step: float) -> None:
    """Adam's state exists only after a first step: create it (zero moments, the saved step count) through the
    torch optimizer's own load_state_dict, then let DeepSpeed link each parameter's fragment of it."""
    optimizer = engine.basic_optimizer
    saved = optimizer.state_dict()
    if saved["state"]:
        raise CheckpointError("the optimizer already holds state: the elastic checkpoint loads into a new engine")
    state = {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for p, index in zip(group["params"], saved_group["params"]):
            state[index] = {"step": torch.tensor(step, dtype=torch.float32),
                            **{k: torch.zeros_like(p, dtype=torch.float32) for k in MOMENTS}}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Point each parameter's DeepSpeed fragment at its slice of Adam's state, which the accessors read and write.
    DeepSpeed 0.19.8 links them once, right after the *first* parameter group's first step, when the other groups
    have no state yet (their moments are then "not found"): link them again here. Private API, version-pinned by
    ep_adapter.check_versions and tested by tests/test_checkpoint_elastic.py."""
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
