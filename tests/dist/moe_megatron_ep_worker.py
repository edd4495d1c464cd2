"""torchrun --nproc_per_node 2 worker: the megatron block and model with experts split over 2 ranks (EP=2, gloo)
against the native ones holding every expert (EP=1). Each rank feeds its own tokens; the alltoall dispatcher sends
them to the rank owning their experts. Prints "EP worker OK" per rank."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from moe_parity import block_pair, forward_backward, hf_grads, reference_megatron_losses, rel_diff  # noqa: E402

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction  # noqa: E402
from timemoe_train.model.moe_megatron import finish_megatron_step  # noqa: E402
from timemoe_train.model.state_dict_adapter import hf_to_megatron, megatron_to_hf  # noqa: E402
from timemoe_train.parallel import destroy_parallel, init_parallel  # noqa: E402

TOL = 1e-5


def check(name, diff, tol=TOL):
    assert diff < tol, f"rank {dist.get_rank()}: {name} differs by {diff:.2e} (relative)"


def main():
    config = TimeMoeConfig.preset("tiny")
    layout = init_parallel(expert_parallel_size=2, num_experts=config.num_experts)
    rank = layout.rank
    assert (layout.world_size, layout.ep_size, layout.ep_rank, layout.dp_size, layout.dp_rank,
            layout.expert_dp_size) == (2, 2, rank, 2, rank, 1), layout

    # One block: outputs, logits and input gradients are per rank; an expert's gradient gathers both ranks' tokens.
    native, megatron = block_pair(config, ep_rank=rank, ep_size=2, seed=0)  # same weights on both ranks
    torch.manual_seed(100 + rank)  # different tokens on each rank
    x_BTD = torch.randn(2, 29 + 6 * rank, config.hidden_size)
    for what, ref, got in zip(("output", "logits", "input grad"),
                              forward_backward(native, x_BTD), forward_backward(megatron, x_BTD)):
        check(what, rel_diff(got, ref))
    native_grads = hf_grads(native, config)
    megatron_grads = hf_grads(megatron, config, ep_rank=rank, ep_size=2)
    for name in sorted(n for n in native_grads if ".experts." in n):  # the same order on every rank
        dist.all_reduce(native_grads[name])
    assert len(megatron_grads) < len(native_grads)  # this rank holds half of the experts
    for name, got in megatron_grads.items():
        check(name, rel_diff(got, native_grads[name]))

    # This rank exports its experts under their global numbers; the ranks together give back every weight.
    parts = [None, None]
    dist.all_gather_object(parts, megatron_to_hf(megatron.state_dict(), config, ep_rank=rank, ep_size=2))
    gathered = {**parts[0], **parts[1]}
    assert gathered.keys() == native.state_dict().keys()
    assert all(torch.equal(gathered[k], v) for k, v in native.state_dict().items())

    # The whole model, loaded from a full released state dict at EP=2 (as trainer.init_from_hf does).
    torch.manual_seed(0)
    ref_model = TimeMoeForPrediction(config)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny", moe_impl="megatron"))
    model.load_state_dict(hf_to_megatron(ref_model.state_dict(), config, ep_rank=rank, ep_size=2))
    torch.manual_seed(200 + rank)
    x_BT = torch.randn(2, 33)
    losses = [m(x_BT[:, :-1], labels_BT=x_BT[:, 1:]).loss for m in (ref_model, model)]
    check("model loss", rel_diff(losses[1], losses[0]))

    # megatron's balancing loss is reported as the mean over layers and data-parallel ranks.
    aux_model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny", moe_impl="megatron", aux_loss_type="megatron"))
    inputs = []
    for layer in aux_model.model.layers:
        layer.ffn_layer.register_forward_hook(lambda mod, args, out: inputs.append((args[0], mod.router.weight)))
    aux_model.train()(x_BT[:, :-1], labels_BT=x_BT[:, 1:]).loss.backward()
    local = torch.stack([reference_megatron_losses(x.reshape(-1, config.hidden_size), w, config.num_experts_per_tok,
                                                   1.0, 0.0)[0] for x, w in inputs]).mean().detach()
    dist.all_reduce(local)
    check("logged balancing loss", abs(finish_megatron_step(aux_model)["load_balancing_loss"] - local.item() / 2))

    destroy_parallel()
    print("EP worker OK", flush=True)


if __name__ == "__main__":
    main()
