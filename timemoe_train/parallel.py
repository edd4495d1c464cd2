"""Process groups for data and expert parallelism, laid out by megatron-core's `parallel_state`.

The trainer calls `validate_layout` before launching (pure arithmetic, clear errors), `init_parallel` once per
process, and `destroy_parallel` at the end:

    layout = init_parallel(expert_parallel_size=2, num_experts=config.num_experts)
    sampler = DistributedSampler(dataset, num_replicas=layout.dp_size, rank=layout.dp_rank)

Every rank is a data-parallel replica of the dense weights (dp_size = world: the Time-MoE model has no
tensor-parallel layers, every matrix fits one device); experts are split over
`ep_size` ranks, and each expert's replicas form the expert-data-parallel group (`expert_dp_size` = world / EP)
over which its gradients are averaged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class ParallelLayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    dp_size: int  # data-parallel replicas of the dense weights: what the data loader shards over
    dp_rank: int
    ep_size: int  # ranks the experts are split over
    ep_rank: int
    expert_dp_size: int  # replicas of each expert
    expert_dp_rank: int
    dp_group: dist.ProcessGroup = field(repr=False, compare=False)
    ep_group: dist.ProcessGroup = field(repr=False, compare=False)
    expert_dp_group: dist.ProcessGroup = field(repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def validate_layout(world_size: int, expert_parallel_size: int = 1, num_experts: int | None = None) -> None:
    """Raise ParallelLayoutError naming the offending values if this layout cannot be built."""
    for name, value in (("world_size", world_size), ("expert_parallel_size", expert_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ParallelLayoutError(f"{name}={value!r}: must be a positive integer")
    if world_size % expert_parallel_size:
        raise ParallelLayoutError(
            f"expert_parallel_size={expert_parallel_size} does not divide the world size {world_size} "
            f"(number of processes); choose a divisor of {world_size}")
    if num_experts is not None and num_experts % expert_parallel_size:
        raise ParallelLayoutError(
            f"expert_parallel_size={expert_parallel_size} does not divide num_experts={num_experts}: "
            "every rank must hold the same number of experts")


def _launched_world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


# Default process groups this process has created: every rank runs the same jobs in the same order, so the count
# names the same fresh store prefix on all of them.
_groups_created = 0


def init_process_group(backend: str | None = None) -> None:
    global _groups_created
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # torchrun keeps one TCPStore for every restart of the workers (torch 2.13), and the jobs of a Hydra
        # multirun share it too: under the same keys a restarted attempt, or the next job, would read the previous
        # one's addresses (gloo: "connectFullMesh failed ... Connection refused"). A fresh prefix for each.
        store, rank, world_size = next(dist.rendezvous("env://"))
        fresh = dist.PrefixStore(f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}/group{_groups_created}", store)
        dist.init_process_group(backend, store=fresh, rank=rank, world_size=world_size)
    elif "WORLD_SIZE" in os.environ:  # launched with env:// settings by hand
        dist.init_process_group(backend)
    else:  # a plain `python` run: a one-process group that needs no port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _groups_created += 1


def init_parallel(expert_parallel_size: int = 1, backend: str | None = None,
                  num_experts: int | None = None) -> ParallelLayout:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU, or `backend`) from the torchrun environment — a
    single-process group when not launched by torchrun — then megatron-core's model-parallel groups. Without a
    GPU, megatron-core's CPU patches (`model.megatron_cpu`) are applied here, until `destroy_parallel`.

    Idempotent for the same sizes; different sizes rebuild megatron's groups (all ranks must call it alike)."""
    validate_layout(_launched_world_size(), expert_parallel_size, num_experts)
    init_process_group(backend)

    from megatron.core import parallel_state as ps

    from .model import megatron_cpu

    megatron_cpu.apply()
    same = ps.model_parallel_is_initialized() and ps.get_expert_model_parallel_world_size() == expert_parallel_size
    if not same:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(expert_model_parallel_size=expert_parallel_size)
    return current_layout()


def current_layout() -> ParallelLayout:
    """The layout `init_parallel` built in this process."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        raise RuntimeError("no parallel layout in this process: call timemoe_train.parallel.init_parallel() first")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    from deepspeed.utils import groups as ds_groups

    from .model import megatron_cpu

    ps.destroy_model_parallel()
    megatron_cpu.undo()
    # DeepSpeed keeps its clone of the world group across engines: a second run in this process (the next job of
    # a Hydra multirun) would broadcast over the destroyed one.
    ds_groups._WORLD_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
