"""The seam between megatron-core's experts and DeepSpeed's engine.

DeepSpeed reduces a parameter's gradient over the expert-data-parallel group (instead of the whole data-parallel
group), keeps it in its own ZeRO partition group and writes it to per-expert checkpoint files only when
`param.allreduce is False`, `param.group_name` names an expert group, and the model holds a
`deepspeed.moe.layer.MoE` module. `ExpertMarker` is that module for one megatron MoE layer: it owns no weights of
its own, it only registers the layer's local experts under the path DeepSpeed's checkpoint code expects
(`deepspeed_moe.experts.deepspeed_experts.<i>`).

Uses DeepSpeed internals (`MoE` without its __init__, `groups._create_expert_and_data_parallel`); tested with
the versions in TESTED_VERSIONS. `check_versions()` refuses others until this file is re-tested.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from ..model.moe_megatron import drop_extra_state

TESTED_VERSIONS = {"deepspeed": "0.19.8", "megatron-core": "0.16.1"}
MARKER_PATH = "deepspeed_moe.experts.deepspeed_experts"


class ExpertMarker(MoE):
    def __init__(self, local_experts: nn.ModuleList, num_experts: int, ep_size: int):
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
        self.ep_size, self.num_experts = ep_size, num_experts
        self.num_local_experts = len(local_experts)
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = local_experts
        for p in local_experts.parameters():
            p.allreduce, p.group_name = False, self.expert_group_name
        self.register_state_dict_post_hook(drop_extra_state)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create DeepSpeed's expert groups and check they are megatron's."""
        from megatron.core import parallel_state as ps

        if self.expert_group_name not in groups._get_expert_data_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)
        ours = groups._get_expert_data_parallel_group_ranks(self.expert_group_name)
        megatrons = dist.get_process_group_ranks(ps.get_expert_data_parallel_group())
        if sorted(ours) != sorted(megatrons):
            raise RuntimeError(f"DeepSpeed's expert-data-parallel ranks {ours} differ from megatron's {megatrons}")

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertMarker only labels megatron's experts for DeepSpeed; the MoE layer runs them")


def check_versions() -> None:
    from importlib.metadata import version

    found = {name: version(name) for name in TESTED_VERSIONS}
    if found != TESTED_VERSIONS:
        raise RuntimeError(f"timemoe_train/train/ep_adapter.py was tested with {TESTED_VERSIONS}, found {found}: "
                           "re-run tests/test_train_parallel.py before changing versions and update TESTED_VERSIONS")
