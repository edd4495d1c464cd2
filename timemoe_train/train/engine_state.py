"""This rank's share of the engine's fp32 weights, Adam moments and step count under the released names, out of it
and into it, for the elastic part of a checkpoint (`timemoe_train.checkpoint.elastic`).

At ZeRO 1/2 (and in a bf16 run) DeepSpeed keeps each parameter's fp32 copy and moments partitioned over its
data-parallel group (the expert-data-parallel one for experts): this rank holds one contiguous range of the
flattened parameter, `param._hp_mapping` (DeepSpeed's fragment record, which its universal checkpoint reads too:
`lp_fragment_address` is where the range starts in the parameter, `hp_fragment` / `get_hp_fragment(key)` its
fp32 values and moments). Saving writes just that range of each released tensor; loading reads just that range,
plus the whole weights for the module's own copy (full on every rank at ZeRO <= 2). Nothing is gathered. ZeRO-0
in fp32 keeps no master copy: there the parameter and the torch optimizer's own state are the full tensors.
The fragment record is private API, version-pinned by ep_adapter.check_versions and tested by
tests/test_checkpoint_elastic.py.
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import CheckpointError
from ..checkpoint.elastic import MODEL, MOMENTS, OPTIMIZER_STEP, Chunks
from ..model.hf_layout import released_view


def _has_master(p: torch.Tensor) -> bool:
    """DeepSpeed keeps this parameter's fp32 copy and moments in its partitions (ZeRO 1/2, bf16)."""
    return hasattr(p, "_hp_mapping")


def adam_stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Adam has taken a step. Its state (step count, moments) only exists from the first one on: until then (every
    step so far skipped by the non-finite guard) there is none, only the empty entries DeepSpeed's accessors add."""
    return any("step" in s for s in optimizer.state.values())


def adam_step(optimizer: torch.optim.Optimizer) -> float:
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if not steps:
        return 0.0
    if len(steps) != 1:
        raise RuntimeError(f"optimizer step counts {sorted(steps)}: expected one value for every parameter")
    return steps.pop()


def released_ranges(model, ep_rank: int, ep_size: int) -> dict[str, list[tuple[str, int, torch.Size]]]:
    """Parameter name -> the released tensors it holds: (released name, first element in the flattened parameter,
    shape). Under megatron one `linear_fc1` holds gate_proj's rows then up_proj's; otherwise one each."""
    params = dict(model.named_parameters())
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes, n) for n, p in params.items())
    ranges = {n: [] for n in params}
    for released, view in released_view(model, {n: p.data for n, p in params.items()}, ep_rank, ep_size).items():
        owner = next((n for lo, hi, n in spans if lo <= view.data_ptr() < hi), None)
        if owner is None or not view.is_contiguous():
            raise RuntimeError(f"{released}: not a contiguous range of one parameter")
        p = params[owner]
        ranges[owner].append((released, (view.data_ptr() - p.data_ptr()) // p.element_size(), view.shape))
    return ranges


def _owned(p: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(first element, fp32 values) of the range of `p` this rank owns; no values: it owns none."""
    if not _has_master(p):
        return 0, p.detach().float().view(-1)
    if p._hp_mapping is None:
        return 0, None
    return p._hp_mapping.lp_fragment_address.start, p._hp_mapping.hp_fragment


def _owned_moments(engine, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adam's moments over the range `_owned` gives (once Adam has stepped: its state exists from then on)."""
    if not _has_master(p):
        return {k: engine.basic_optimizer.state[p][k].view(-1) for k in MOMENTS}
    return {k: p._hp_mapping.get_hp_fragment(k) for k in MOMENTS}


def _add_ranges(state: dict, key: str, start: int, values: torch.Tensor, ranges) -> None:
    """Into state[`key`.released]: the part of `values` (elements [start, …) of one flattened parameter) that
    falls in each released tensor of that parameter."""
    for released, first, shape in ranges:
        lo, hi = max(first, start), min(first + math.prod(shape), start + values.numel())
        if lo < hi:
            state.setdefault(f"{key}.{released}", Chunks(shape)).add_range(lo - first, values[lo - start:hi - start])


def engine_state(engine, model, ep_rank: int, ep_size: int) -> dict[str, Chunks]:
    """This rank's entries of the elastic checkpoint: views of what it owns (no communication). Before Adam's first
    step: zero moments and step count 0, from which a resumed run's first step goes on exactly as Adam's would."""
    stepped = adam_stepped(engine.basic_optimizer)
    if stepped:
        _link_optimizer_state(engine)
    ranges = released_ranges(model, ep_rank, ep_size)
    state = {}
    for name, p in model.named_parameters():
        start, weights = _owned(p)
        if weights is None:
            continue
        # Before the first step: zero moments, what Adam's first step starts from.
        moments = _owned_moments(engine, p) if stepped else {k: torch.zeros_like(weights) for k in MOMENTS}
        for key, values in ((MODEL, weights), *moments.items()):
            _add_ranges(state, key, start, values, ranges[name])
    state[OPTIMIZER_STEP] = Chunks.whole(torch.tensor(adam_step(engine.basic_optimizer), dtype=torch.float64))
    return state


def load_engine_state(engine, model, ep_rank: int, ep_size: int, read) -> None:
    """`read(state)` fills the Chunks of `state` (collective); here: the whole weights for the module's own copy,
    and the moments of the range each parameter's fp32 copy has on this rank, into a freshly built engine (any
    ZeRO stage 0-2, any layout)."""
    step = {OPTIMIZER_STEP: Chunks.whole(torch.zeros((), dtype=torch.float64))}
    read(step)
    _seed_optimizer_state(engine, float(step[OPTIMIZER_STEP].boxes[()]))
    ranges = released_ranges(model, ep_rank, ep_size)
    params = dict(model.named_parameters())
    # The weights straight into the parameters (fp32), else through one fp32 copy (bf16 keeps its master apart).
    weights = {n: p.data if p.dtype == torch.float32 else torch.empty(p.shape, dtype=torch.float32)
               for n, p in params.items()}
    state = {}
    for name, p in params.items():
        _add_ranges(state, MODEL, 0, weights[name].view(-1), ranges[name])
        start, values = _owned(p)
        for key, into in (_owned_moments(engine, p) if values is not None else {}).items():
            _add_ranges(state, key, start, into, ranges[name])
    read(state)
    with torch.no_grad():
        for name, p in params.items():
            if weights[name] is not p.data:
                p.copy_(weights[name])
            start, values = _owned(p)
            if _has_master(p) and values is not None:
                values.copy_(weights[name].view(-1)[start:start + values.numel()])


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
    _link_optimizer_state(engine, again=True)


def _link_optimizer_state(engine, again: bool = False) -> None:
    """Point each parameter's DeepSpeed fragment at its slice of Adam's state, which the accessors read and write.
    DeepSpeed 0.19.8 links them once, right after the *first* parameter group's first step, when the other groups
    have no state yet (their moments are then "not found"): link them again here when a moment is missing, or
    `again` (a state just loaded). Relinking copies the moments into new tensors: not at every save. Private API,
    version-pinned by ep_adapter.check_versions and tested by tests/test_checkpoint_elastic.py."""
    zero = engine.optimizer
    if not hasattr(zero, "_hp_optimizer_states_linked"):
        return
    fragments = [p._hp_mapping for p in engine.module.parameters() if getattr(p, "_hp_mapping", None) is not None]
    if again or any(set(MOMENTS) - set(f.optim_fragment or {}) for f in fragments):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
