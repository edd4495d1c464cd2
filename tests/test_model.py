"""The model against independent references: written here from the Time-MoE paper (Shi et al., ICLR 2025) and the
released TimeMoE-50M/200M checkpoints' parameter list, not from timemoe_train.model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from timemoe_train.checkpoint import CheckpointError
from timemoe_train.model import ConfigError, TimeMoeConfig, TimeMoeForPrediction, load_balancing_loss
from timemoe_train.model.modeling import apply_rotary, rotary_cos_sin


def tiny(**kw):
    return TimeMoeConfig.preset("tiny", **kw)


def per_token_moe(sd: dict, top_k: int, x_ND):
    """One token at a time, one chosen expert at a time, from the released per-expert weights `sd`."""
    out = []
    for x_D in x_ND:
        p = torch.softmax(x_D @ sd["gate.weight"].T, -1)
        w, idx = torch.topk(p, top_k)
        y = torch.zeros_like(x_D)
        for weight, e in zip(w, idx.tolist()):
            g, u, d = (sd[f"experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            y = y + weight * (d @ (F.silu(g @ x_D) * (u @ x_D)))
        g, u, d = (sd[f"shared_expert.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        y = y + torch.sigmoid(sd["shared_expert_gate.weight"] @ x_D) * (d @ (F.silu(g @ x_D) * (u @ x_D)))
        out.append(y)
    return torch.stack(out)


def test_native_moe_equals_per_token_loop():
    torch.manual_seed(0)
    model = TimeMoeForPrediction(tiny(hidden_size=64, num_attention_heads=4, num_experts=6))
    layer = model.model.layers[0].ffn_layer
    x_BTD = torch.randn(3, 37, 64)  # 111 tokens: not a multiple of the grouped GEMM's row alignment
    y_BTD, logits_NE = layer(x_BTD)
    sd = {k: v.detach().clone().requires_grad_() for k, v in layer.state_dict().items()}
    ref = per_token_moe(sd, layer.top_k, x_BTD.reshape(-1, 64))
    torch.testing.assert_close(y_BTD.reshape(-1, 64), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_NE, x_BTD.reshape(-1, 64) @ layer.gate.weight.T, atol=1e-6, rtol=1e-6)

    y_BTD.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    stacked = {"gate_proj": layer.experts.gate_proj_EIH, "up_proj": layer.experts.up_proj_EIH,
               "down_proj": layer.experts.down_proj_EHI}
    for e in range(layer.num_experts):
        for proj, param in stacked.items():
            torch.testing.assert_close(param.grad[e], sd[f"experts.{e}.{proj}.weight"].grad, atol=1e-4, rtol=1e-4)
    for name, param in [("gate.weight", layer.gate.weight), ("shared_expert_gate.weight",
                                                             layer.shared_expert_gate.weight)]:
        torch.testing.assert_close(param.grad, sd[name].grad, atol=1e-4, rtol=1e-4)


def test_aux_loss_on_hand_built_routing():
    # Two layers x two tokens, 3 experts, top-1. Probabilities chosen so the top-1 picks are e0, e0 | e1, e2.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    logits = probs.log()
    # f = [2/4, 1/4, 1/4]; P = column means = [0.375, 0.325, 0.3]; aux = 3 * Σ f·P
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.325 + 0.25 * 0.3)
    got = load_balancing_loss([logits[:2], logits[2:]], top_k=1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Perfect balance with top-k = 2 of 2 experts gives exactly k.
    assert load_balancing_loss([torch.zeros(5, 2)], top_k=2).item() == pytest.approx(2.0)
    # Padding rows are excluded when a token mask is given.
    masked = load_balancing_loss([logits[:2], logits[2:]], top_k=1, token_mask_N=torch.tensor([True, False]))
    # rows kept: 0 (layer 0) and 2 (layer 1): picks e0, e1; P = mean of rows 0 and 2
    p = (probs[0] + probs[2]) / 2
    assert masked.item() == pytest.approx(3 * (0.5 * p[0] + 0.5 * p[1]).item(), abs=1e-6)


def test_huber_mask_and_horizon_unfolding_by_hand():
    config = tiny(horizon_lengths=[1, 3], apply_aux_loss=False)
    model = TimeMoeForPrediction(config)
    T = 4
    preds = {1: torch.zeros(1, T, 1), 3: torch.zeros(1, T, 3)}
    for h, p in preds.items():  # predictions: head h at position t predicts value 10*t + j for j < h
        for t in range(T):
            p[0, t] = torch.tensor([10.0 * t + j for j in range(h)])
    model.lm_heads[0].forward = lambda h_BTD: preds[1]
    model.lm_heads[1].forward = lambda h_BTD: preds[3]
    labels = torch.tensor([[0.0, 11.0, 23.5, 30.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last label is padding
    out = model(torch.zeros(1, T), labels, mask)

    def huber(a, b, delta=2.0):
        d = abs(a - b)
        return 0.5 * d * d if d <= delta else delta * (d - 0.5 * delta)

    # head 1: position t predicts labels[t] with value 10t: errors 0, 1, 3.5 (t=3 masked)
    h1 = (huber(0, 0) + huber(10, 11) + huber(20, 23.5)) / 3
    # head 3: position t predicts labels[t..t+2] with 10t + j; valid while t+j < 3 (mask) and < T
    terms = [huber(10 * t + j, labels[0, t + j].item()) for t in range(T) for j in range(3) if t + j < 3]
    h3 = sum(terms) / len(terms)
    torch.testing.assert_close(out.head_losses, torch.tensor([h1, h3]))
    assert out.loss.item() == pytest.approx((h1 + h3) / 2, rel=1e-6)


def test_rope_matches_closed_form():
    d, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, d)
    pos = torch.arange(5).unsqueeze(0)
    cos, sin = rotary_cos_sin(pos, d, theta, torch.float32)
    got = apply_rotary(x, cos, sin)
    want = torch.empty_like(x)
    for t in range(5):
        for i in range(d // 2):
            a = t / theta ** (2 * i / d)
            x1, x2 = x[0, 0, t, i], x[0, 0, t, i + d // 2]  # rotate-half pairs i with i + d/2
            want[0, 0, t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[0, 0, t, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    torch.testing.assert_close(got, want)


def spec_base_shapes():
    """The released TimeMoE-50M's parameter names and shapes (its model.safetensors index), written out."""
    H, I, E, k = 384, 1536, 8, 2
    shapes = {"model.embed_layer.emb_layer.weight": [H, 1], "model.embed_layer.gate_layer.weight": [H, 1],
              "model.norm.weight": [H]}
    for n in range(12):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = [H]
        shapes[p + "post_attention_layernorm.weight"] = [H]
        for q in "qkv":
            shapes[p + f"self_attn.{q}_proj.weight"] = [H, H]
            shapes[p + f"self_attn.{q}_proj.bias"] = [H]
        shapes[p + "self_attn.o_proj.weight"] = [H, H]
        shapes[p + "ffn_layer.gate.weight"] = [E, H]
        for m in range(E):
            shapes[p + f"ffn_layer.experts.{m}.gate_proj.weight"] = [I // k, H]
            shapes[p + f"ffn_layer.experts.{m}.up_proj.weight"] = [I // k, H]
            shapes[p + f"ffn_layer.experts.{m}.down_proj.weight"] = [H, I // k]
        shapes[p + "ffn_layer.shared_expert.gate_proj.weight"] = [I, H]
        shapes[p + "ffn_layer.shared_expert.up_proj.weight"] = [I, H]
        shapes[p + "ffn_layer.shared_expert.down_proj.weight"] = [H, I]
        shapes[p + "ffn_layer.shared_expert_gate.weight"] = [1, H]
    for j, h in enumerate([1, 8, 32, 64]):
        shapes[f"lm_heads.{j}.out_layer.weight"] = [h, H]
    return shapes


def test_base_export_matches_spec_layout(tmp_path):
    model = TimeMoeForPrediction(TimeMoeConfig.preset("base"))
    assert sum(p.numel() for p in model.parameters()) == 113_352_192
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        got = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert len(got) == 463
    assert got == spec_base_shapes()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "time_moe" and config["architectures"] == ["TimeMoeForPrediction"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_time_moe.TimeMoeForPrediction"
    assert "moe_impl" not in config  # training-time choices stay out of the weights' config


def test_large_parameter_count():
    with torch.device("meta"):
        model = TimeMoeForPrediction(TimeMoeConfig.preset("large"))
    assert sum(p.numel() for p in model.parameters()) == 453_196_800


@pytest.mark.parametrize("dense", [False, True])
def test_save_load_is_bit_identical(tmp_path, dense):
    torch.manual_seed(1)
    model = TimeMoeForPrediction(tiny(use_dense=dense)).eval()
    x = torch.randn(2, 40)
    model.save_pretrained(tmp_path)
    loaded = TimeMoeForPrediction.from_pretrained(tmp_path).eval()
    for a, b in zip(model(x).predictions, loaded(x).predictions):
        assert torch.equal(a, b)
    assert torch.equal(model.forecast(x, 20), loaded.forecast(x, 20))


def test_forecast_96_takes_two_forward_passes_and_matches_full_recompute():
    torch.manual_seed(2)
    model = TimeMoeForPrediction(tiny()).eval()
    calls = []
    model.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    ctx = torch.randn(3, 100) * 5 + 7
    fc = model.forecast(ctx, 96)
    assert fc.shape == (3, 96)
    assert calls == [100, 64]  # head 64 on the context, then head 32 on the 64 new points

    # Without a KV cache: re-run the whole normalised sequence each step.
    mean, std = ctx.mean(1, keepdim=True), ctx.std(1, keepdim=True, unbiased=False)
    seq = (ctx - mean) / std
    with torch.no_grad():
        p64 = model(seq).predictions[3][:, -1]
        p32 = model(torch.cat([seq, p64], 1)).predictions[2][:, -1]
    torch.testing.assert_close(fc, torch.cat([p64, p32], 1) * std + mean, atol=1e-5, rtol=1e-5)


def test_forecast_720_head_schedule():
    model = TimeMoeForPrediction(tiny()).eval()
    calls = []
    model.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    model.forecast(torch.randn(1, 16), 720)
    assert calls[1:] == [64] * 11 + [8]  # 11 x 64 + 8 + 8: the inputs of each step after the context


def test_packed_sequences_do_not_see_each_other():
    torch.manual_seed(3)
    model = TimeMoeForPrediction(tiny()).eval()
    a, b = torch.randn(1, 20), torch.randn(1, 12)
    ids = torch.tensor([[0] * 20 + [1] * 12])
    packed = model(torch.cat([a, b], 1), sequence_ids_BT=ids).predictions
    alone = model(b).predictions
    for p, q in zip(packed, alone):
        torch.testing.assert_close(p[:, 20:], q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, field", [
    (dict(hidden_size=30), "hidden_size"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(horizon_lengths=[1, 32, 8]), "horizon_lengths"),
    (dict(moe_impl="deepspeed"), "moe_impl"),
    (dict(embed_init_std=0.0), "embed_init_std"),
])
def test_inconsistent_config_is_rejected(kw, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**kw)


def test_embedding_init_scale_decides_whether_the_model_sees_the_sign_of_its_input():
    """At the released init (0.02) silu(g·x)·(e·x) ≈ g·e·x²/2: +1 and -1 embed to almost the same direction.
    embed_init_std rescales only the embedding's two weights; every other weight keeps initializer_range."""
    def embeddings(**kw):
        torch.manual_seed(0)
        model = TimeMoeForPrediction(tiny(hidden_size=64, **kw))
        return model, model.model.embed_layer(torch.tensor([[1.0], [-1.0]]))

    released, e = embeddings()
    assert F.cosine_similarity(e[0], e[1], dim=0) > 0.99
    assert released.model.embed_layer.gate_layer.weight.std().item() == pytest.approx(0.02, rel=0.3)
    fan_in, e = embeddings(embed_init_std=1.0)
    assert F.cosine_similarity(e[0], e[1], dim=0) < 0.7
    for name in ("gate_layer", "emb_layer"):
        assert getattr(fan_in.model.embed_layer, name).weight.std().item() == pytest.approx(1.0, rel=0.3)
    assert fan_in.lm_heads[0].out_layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert "embed_init_std" not in fan_in.config.to_hf_dict()  # a training-time choice, not the weights'


def test_checkpoint_mismatches_are_listed(tmp_path):
    model = TimeMoeForPrediction(tiny())
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = torch.zeros(1)
    sd["lm_heads.1.out_layer.weight"] = torch.zeros(7, 32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        TimeMoeForPrediction.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "missing (1): model.norm.weight" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "lm_heads.1.out_layer.weight: (7, 32) (expected (8, 32))" in msg


def test_pickled_weights_are_refused(tmp_path):
    TimeMoeConfig.preset("tiny").save(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        TimeMoeForPrediction.from_pretrained(tmp_path)
