"""The native MoE block's expert GEMMs (model.expert_gemm): grouped (aligned groups) and looped, against the
per-token reference of test_model.py; the GPU-only claims (no host sync, bf16 grouped GEMM) under `cuda`."""

import pytest
import torch

from test_model import per_token_moe
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.model.moe import _GROUPED_MM_ROW_ALIGN, resolve_expert_gemm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def moe_layer(gemm: str, device="cpu"):
    torch.manual_seed(0)
    config = TimeMoeConfig.preset("tiny", hidden_size=64, num_attention_heads=4, num_experts=6, expert_gemm=gemm)
    return TimeMoeForPrediction(config).model.layers[0].ffn_layer.to(device)


def check_against_reference(layer, x_BTD, tol):
    y_BTD, _ = layer(x_BTD)
    sd = {k: v.detach().float().clone().requires_grad_() for k, v in layer.state_dict().items()}
    ref = per_token_moe(sd, layer.top_k, x_BTD.reshape(-1, x_BTD.shape[-1]).float())
    torch.testing.assert_close(y_BTD.reshape(ref.shape).float(), ref, **tol)
    y_BTD.float().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    stacked = {"gate_proj": layer.experts.gate_proj_EIH, "up_proj": layer.experts.up_proj_EIH,
               "down_proj": layer.experts.down_proj_EHI}
    for e in range(layer.num_experts):
        for proj, param in stacked.items():
            torch.testing.assert_close(param.grad[e].float(), sd[f"experts.{e}.{proj}.weight"].grad, **tol)
    torch.testing.assert_close(layer.gate.weight.grad.float(), sd["gate.weight"].grad, **tol)


@pytest.mark.parametrize("gemm", ["grouped_mm", "loop"])
def test_expert_gemms_equal_the_per_token_reference(gemm):
    x_BTD = torch.randn(3, 37, 64, generator=torch.Generator().manual_seed(1))  # 111 tokens, 6 experts: unaligned
    check_against_reference(moe_layer(gemm), x_BTD, dict(atol=1e-4, rtol=1e-4))


def test_grouped_gemm_with_an_expert_that_gets_no_token():
    layer = moe_layer("grouped_mm")
    with torch.no_grad():
        layer.gate.weight[5] = -100.0  # expert 5 never wins
    x_BTD = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(2))
    check_against_reference(layer, x_BTD, dict(atol=1e-4, rtol=1e-4))


def test_group_starts_are_aligned(monkeypatch):
    seen = []
    real = torch._grouped_mm

    def spy(a, b, offs):
        seen.append((a.shape[0], offs.tolist()))
        return real(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    moe_layer("grouped_mm")(torch.randn(1, 111, 64))
    rows, offs = seen[0]
    assert all(o % _GROUPED_MM_ROW_ALIGN == 0 for o in offs) and rows % _GROUPED_MM_ROW_ALIGN == 0
    assert offs[-1] <= rows


def test_auto_expert_gemm_per_device():
    assert resolve_expert_gemm("auto", torch.device("cpu"), torch.float32) == "grouped_mm"
    assert resolve_expert_gemm("loop", torch.device("cpu"), torch.bfloat16) == "loop"


@pytest.mark.cuda
@cuda
def test_cuda_grouped_gemm_bf16_equals_loop_and_never_syncs():
    x_BTD = torch.randn(4, 512, 64, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for gemm in ("grouped_mm", "loop"):
        layer = moe_layer(gemm, "cuda").to(torch.bfloat16)
        if gemm == "grouped_mm":
            torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
        try:
            y, _ = layer(x_BTD)
            y.float().pow(2).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs[gemm] = (y.float(), layer.experts.gate_proj_EIH.grad.float())
    torch.testing.assert_close(outs["grouped_mm"][0], outs["loop"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs["grouped_mm"][1], outs["loop"][1], atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@cuda
def test_cuda_fp32_takes_the_loop_and_equals_the_reference():
    assert resolve_expert_gemm("auto", torch.device("cuda"), torch.float32) == "loop"
    torch.backends.cuda.matmul.allow_tf32 = False
    x_BTD = torch.randn(3, 37, 64, device="cuda")
    check_against_reference(moe_layer("auto", "cuda"), x_BTD, dict(atol=1e-4, rtol=1e-4))
