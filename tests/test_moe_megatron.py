"""megatron-core's MoE block against the native one (the same weights mapped by the adapter), its own aux loss
against a hand-written reference, the layout checks, and expert parallelism under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from moe_parity import block_pair, forward_backward, hf_grads, reference_megatron_losses, rel_diff  # noqa: E402

from timemoe_train.model import ConfigError, TimeMoeConfig, TimeMoeForPrediction  # noqa: E402
from timemoe_train.model.moe_megatron import (  # noqa: E402
    MegatronMoELayer, finish_megatron_step, set_aux_loss_scale)
from timemoe_train.model.state_dict_adapter import (  # noqa: E402
    StateDictMappingError, hf_to_megatron, megatron_to_hf)
from timemoe_train.parallel import (ParallelLayoutError, destroy_parallel, init_parallel,  # noqa: E402
                                    validate_layout)

TOL = 1e-5  # fp32, relative to the reference's largest magnitude


@pytest.fixture(autouse=True, scope="module")
def one_process_layout():
    """megatron's layer needs its parallel groups, which only `init_parallel` creates."""
    init_parallel()
    yield
    destroy_parallel()


def tiny(**kw):
    return TimeMoeConfig.preset("tiny", **kw)


def test_block_outputs_and_gradients_match_native():
    config = tiny()
    native, megatron = block_pair(config)
    x_BTD = torch.randn(3, 37, config.hidden_size)
    for ref, got in zip(forward_backward(native, x_BTD), forward_backward(megatron, x_BTD)):
        assert rel_diff(got, ref) < TOL  # outputs, router logits (batch-major), input gradients
    assert rel_diff(hf_grads(megatron, config), hf_grads(native, config)) < TOL


def test_swapped_glu_halves_are_caught():
    config = tiny()
    native, megatron = block_pair(config)
    swapped = {k: torch.cat(v.chunk(2)[::-1]) if k.endswith("linear_fc1.weight") else v
               for k, v in megatron.state_dict().items()}
    megatron.load_state_dict(swapped)
    x_BTD = torch.randn(2, 16, config.hidden_size)
    assert rel_diff(forward_backward(megatron, x_BTD)[0], forward_backward(native, x_BTD)[0]) > 1e-2


def test_full_model_loss_and_gradients_match_native(tmp_path):
    torch.manual_seed(0)
    native = TimeMoeForPrediction(tiny())
    megatron = TimeMoeForPrediction(tiny(moe_impl="megatron"))
    megatron.load_state_dict(hf_to_megatron(native.state_dict(), native.config))
    x_BT = torch.randn(2, 41)
    seq_BT = torch.tensor([[0] * 20 + [1] * 21, [0] * 35 + [-1] * 6])  # packed and padded rows
    outs = [m(x_BT[:, :-1], labels_BT=x_BT[:, 1:], sequence_ids_BT=seq_BT[:, :-1]) for m in (native, megatron)]
    assert outs[1].aux_loss is not None and outs[1].aux_loss > 0
    assert rel_diff(outs[1].loss, outs[0].loss) < TOL and rel_diff(outs[1].aux_loss, outs[0].aux_loss) < TOL
    for out in outs:
        out.loss.backward()
    assert rel_diff(hf_grads(megatron, megatron.config), hf_grads(native, native.config)) < TOL

    # The HF layout round-trips between the two implementations, bit for bit.
    megatron.save_pretrained(tmp_path)
    for impl, expected in (("native", native), ("megatron", megatron)):
        loaded = TimeMoeForPrediction.from_pretrained(tmp_path, moe_impl=impl).state_dict()
        assert loaded.keys() == expected.state_dict().keys()
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.items())


def test_adapter_round_trips_and_slices_experts():
    config = tiny()
    hf = TimeMoeForPrediction(config).state_dict()
    meg = hf_to_megatron(hf, config)
    back = megatron_to_hf(meg, config)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    again = hf_to_megatron(back, config)
    assert again.keys() == meg.keys() and all(torch.equal(again[k], meg[k]) for k in meg)

    # EP rank 1 of 2 holds global experts 2 and 3 as its local 0 and 1, and exports them under their own numbers.
    rank1 = hf_to_megatron(hf, config, ep_rank=1, ep_size=2)
    fc1 = rank1["model.layers.0.ffn_layer.experts.local_experts.0.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf["model.layers.0.ffn_layer.experts.2.gate_proj.weight"],
                                       hf["model.layers.0.ffn_layer.experts.2.up_proj.weight"]]))
    exported = megatron_to_hf(rank1, config, ep_rank=1, ep_size=2)
    experts = {k.split(".experts.")[1].split(".")[0] for k in exported if ".experts." in k}
    assert experts == {"2", "3"}

    with pytest.raises(StateDictMappingError, match="ep_size=3"):
        hf_to_megatron(hf, config, ep_rank=0, ep_size=3)
    with pytest.raises(StateDictMappingError, match=r"model\.layers\.1\.ffn_layer\.experts\.3\.up_proj\.weight"):
        hf_to_megatron({k: v for k, v in hf.items() if not k.endswith("layers.1.ffn_layer.experts.3.up_proj.weight")},
                       config)


def test_megatron_aux_loss_reaches_router_gradient_and_is_reported():
    config = tiny(moe_impl="megatron", aux_loss_type="megatron", megatron_z_loss_coeff=1e-3)
    block = MegatronMoELayer(config).train()
    finish_megatron_step(block)  # nothing left over from other tests
    x_BTD = torch.randn(2, 24, config.hidden_size)

    def router_grad_from_aux_losses_only():
        block.zero_grad()
        y_BTD, _ = block(x_BTD)
        (y_BTD * 0).sum().backward()  # the main loss contributes nothing: any router gradient is the aux losses'
        return block.router.weight.grad.clone()

    grad = router_grad_from_aux_losses_only()
    weight = block.router.weight.detach().clone().requires_grad_()
    balance, z, total = reference_megatron_losses(x_BTD.reshape(-1, config.hidden_size), weight,
                                                   config.num_experts_per_tok, config.router_aux_loss_factor, 1e-3)
    total.backward()
    assert grad.abs().max() > 0
    assert rel_diff(grad, weight.grad) < TOL
    logged = finish_megatron_step(block)
    assert logged.keys() == {"load_balancing_loss", "z_loss"}
    assert logged["load_balancing_loss"] == pytest.approx(balance.item(), rel=TOL)
    assert logged["z_loss"] == pytest.approx(z.item(), rel=TOL)
    assert finish_megatron_step(block) == {"load_balancing_loss": 0.0, "z_loss": 0.0}  # cleared

    try:  # gradient accumulation over 4 micro-batches: each one's aux gradient counts a quarter
        set_aux_loss_scale(4)
        assert rel_diff(router_grad_from_aux_losses_only(), weight.grad / 4) < TOL
    finally:
        set_aux_loss_scale(1)


def test_megatron_expert_bias_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="megatron_expert_bias=True: .*softmax"):
        MegatronMoELayer(tiny(moe_impl="megatron", aux_loss_type="megatron", megatron_expert_bias=True))


def test_megatron_aux_loss_logged_once_under_activation_checkpointing():
    torch.manual_seed(0)
    model = TimeMoeForPrediction(tiny(moe_impl="megatron", aux_loss_type="megatron")).train()
    finish_megatron_step(model)
    x_BT = torch.randn(2, 33)
    results = []
    for checkpointing in (False, True):
        model.config.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x_BT[:, :-1], labels_BT=x_BT[:, 1:]).loss.backward()
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()}, finish_megatron_step(model)))
    (grads, logged), (grads_ckpt, logged_ckpt) = results
    assert logged["load_balancing_loss"] > 0
    assert logged_ckpt == pytest.approx(logged, rel=1e-6)
    assert rel_diff(grads_ckpt, grads) < TOL


@pytest.mark.parametrize("world, ep, experts, match", [
    (4, 3, 8, "expert_parallel_size=3 does not divide the world size 4"),
    (4, 4, 6, "expert_parallel_size=4 does not divide num_experts=6"),
    (2, 0, 8, "expert_parallel_size=0"),
])
def test_validate_layout_errors(world, ep, experts, match):
    with pytest.raises(ParallelLayoutError, match=match):
        validate_layout(world, ep, experts)
    validate_layout(8, 4, 8)


@pytest.mark.slow
def test_expert_parallel_matches_single_rank():
    worker = Path(__file__).parent / "dist" / "moe_megatron_ep_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("EP worker OK") == 2
