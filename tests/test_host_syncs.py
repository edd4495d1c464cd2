"""No host sync in the model's forward+backward or the step's bookkeeping (counted by bench/host_syncs.py's
dispatch mode on CPU, where the ops are the ones a GPU would wait on), and per optimizer step one of ours (the
veto) plus, at ZeRO-1/2, DeepSpeed's check of its norm."""

import importlib.util
from pathlib import Path

import pytest
import torch

from timemoe_train.model import TimeMoeConfig

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("host_syncs", REPO / "bench" / "host_syncs.py")
host_syncs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_syncs)


@pytest.fixture(scope="module")
def batch():
    return host_syncs.synthetic_batches(1, 2, 128)[0]


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    counter = host_syncs.HostSyncCounter()
    with counter:
        counter.phase = "probe"
        x.sum().item()
        x[x > 2]
        torch.bincount(x.long())
        x.nonzero()
        torch.repeat_interleave(x.long())
        x.tolist()
        torch.repeat_interleave(x, x.long(), output_size=15)  # the size given: no sync
        torch.zeros(6).scatter_add_(0, x.long(), x)
    assert counter.kinds("probe") == {"item": 1, "boolean mask": 1, "bincount": 1, "nonzero": 1,
                                      "repeat_interleave": 1, "tolist": 1}


@pytest.mark.parametrize("attn_impl", ["dense_mask", "causal"])
def test_the_model_forward_and_backward_never_sync(batch, attn_impl):
    config = TimeMoeConfig.preset("tiny", attn_impl=attn_impl, expert_gemm="grouped_mm")
    counter = host_syncs.model_syncs(config, batch)
    assert counter.kinds("model") == {}


def test_the_paths_that_sync_by_design_are_seen(batch):
    config = TimeMoeConfig.preset("tiny", attn_impl="dense_mask", expert_gemm="loop")
    assert host_syncs.model_syncs(config, batch).kinds("model") == {"tolist": config.num_hidden_layers}


def test_the_bookkeeping_never_syncs(batch):
    counter = host_syncs.bookkeeping_syncs(TimeMoeConfig.preset("tiny"), batch, num_domains=3)
    assert counter.kinds("bookkeeping") == {}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, deepspeed_syncs", [(0, {}), (1, {"item": 1}), (2, {"item": 1})])
def test_a_training_step_reads_the_host_only_for_its_veto(zero_stage, deepspeed_syncs):
    counter, gas = host_syncs.trainer_syncs("tiny", 2, 2, 128, (f"parallel.zero_stage={zero_stage}",))
    assert counter.kinds("model") == {} and counter.kinds("bookkeeping") == {}
    # One read of the step's flags (ours). DeepSpeed's ZeRO-1/2 fp32 step checks its norm is finite (a bool of a
    # device tensor); its clipping would read it again once per parameter group, so the optimizer clips instead.
    assert counter.kinds("step") == {"tolist": 1, **deepspeed_syncs}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trainer_step_syncs_only_for_its_veto():
    """The real Trainer's step on the GPU path (bf16, FlexAttention, grouped GEMM, DeepSpeed ZeRO-1, guard hooks,
    bookkeeping) under torch.cuda.set_sync_debug_mode: "error" in each micro-batch's forward, backward and
    bookkeeping; in the optimizer step the syncs CUDA warns about are counted."""
    counter, gas = host_syncs.trainer_syncs("tiny", 2, 2, 512, device="cuda")
    assert counter.kinds("model") == {} and counter.kinds("bookkeeping") == {}
    assert counter.total("step") <= 2, counter.kinds("step")
