"""The remote code shipped in every export, against timemoe-train's own model (two independent implementations)
and against bench/reference/modeling_time_moe.py, which computes what the released code computes the way it
computes it (eager attention, per-expert mask loop): the released-format reference the fast export must equal.

Loading goes through `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` exactly as a serving
stack does; transformers is the installed one (5.x at the time of writing) and, in a subprocess, 4.40 from
.cache/transformers-4.40 (which `make test` installs there).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from timemoe_train.model.hf_layout import REMOTE_CODE_DIR
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

transformers = pytest.importorskip("transformers")


def make_ours(**overrides) -> TimeMoeForPrediction:
    torch.manual_seed(0)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny", **overrides)).eval()
    # Heads of std 0.3 give O(1) forecasts, so the roll-out feeds back values that matter (at 0.02 they are ~0).
    with torch.no_grad():
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
    return model


def load_remote(directory, **kwargs):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, output_loading_info=True, **kwargs)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    return model.eval()


def random_walks(batch: int, length: int):
    g = torch.Generator().manual_seed(1)
    return 5.0 + torch.randn(batch, length, generator=g).cumsum(dim=1)


def assert_forecasts_match(ours, theirs, context_BT, horizons=(96, 720)):
    for horizon in horizons:
        a, b = ours.forecast(context_BT, horizon), theirs.forecast(context_BT, horizon)
        assert a.shape == b.shape == (context_BT.shape[0], horizon)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-4, f"horizon {horizon}: relative difference {rel:.2e}"
        # The roll-out must actually move: a forecast stuck at the context mean would match trivially.
        assert (b - context_BT.mean(1, keepdim=True)).abs().max() > 0.1


@pytest.mark.parametrize("overrides", [{}, {"use_dense": True}, {"num_key_value_heads": 2}],
                         ids=["moe", "dense", "gqa"])
def test_remote_code_matches_our_model(tmp_path, overrides):
    ours = make_ours(**overrides)
    ours.save_pretrained(tmp_path)
    assert {"configuration_time_moe.py", "modeling_time_moe.py"} <= {p.name for p in tmp_path.glob("*.py")}
    theirs = load_remote(tmp_path)
    assert type(theirs).__module__.startswith("transformers_modules")  # the copy in tmp_path, not our package
    assert theirs.dtype == torch.float32

    x_BT = random_walks(3, 77)
    labels_BT = torch.roll(x_BT, -1, dims=1)
    mask_BT = torch.ones_like(x_BT)
    mask_BT[:, -1] = 0
    mask_BT[0, 40:] = 0
    with torch.no_grad():
        a = ours(x_BT, labels_BT=labels_BT, loss_mask_BT=mask_BT)
        b = theirs(input_ids=x_BT, labels=labels_BT, loss_masks=mask_BT)
    assert len(a.predictions) == len(b.predictions) == 4
    for h, pa, pb in zip(ours.config.horizon_lengths, a.predictions, b.predictions):
        assert pb.shape == (3, 77, h)
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    if not ours.config.use_dense:
        torch.testing.assert_close(a.aux_loss, b.aux_loss, atol=1e-6, rtol=1e-6)
        for la, lb in zip(a.router_logits, b.router_logits):
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)

    assert_forecasts_match(ours, theirs, random_walks(4, 300))


def test_generate_picks_largest_head_and_reuses_cache(tmp_path):
    make_ours().save_pretrained(tmp_path)
    theirs = load_remote(tmp_path)
    x_BT = random_walks(2, 50)
    out = theirs.generate(x_BT, max_new_tokens=41)  # 41 = 32 + 8 + 1
    assert out.shape == (2, 91)
    torch.testing.assert_close(out[:, :50], x_BT)
    # Without a cache: the whole sequence again at every step, head chosen by hand.
    seq = x_BT
    for h, j in ((32, 2), (8, 1), (1, 0)):
        with torch.no_grad():
            step = theirs(seq, use_cache=False).predictions[j][:, -1]
        assert step.shape == (2, h)
        seq = torch.cat([seq, step], dim=1)
    torch.testing.assert_close(out, seq, atol=1e-5, rtol=1e-5)


def released_config(config: TimeMoeConfig) -> dict:
    """config.json as the released checkpoints ship it (transformers 4.40 era, bf16, keys in their own order)."""
    return {
        "_name_or_path": "time_moe_tiny", "apply_aux_loss": True, "architectures": ["TimeMoeForPrediction"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_time_moe.TimeMoeConfig",
                     "AutoModelForCausalLM": "modeling_time_moe.TimeMoeForPrediction"},
        "hidden_act": "silu", "hidden_size": config.hidden_size, "horizon_lengths": [1, 8, 32, 64],
        "initializer_range": 0.02, "input_size": 1, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": 4096, "model_type": "time_moe",
        "num_attention_heads": config.num_attention_heads, "num_experts": config.num_experts,
        "num_experts_per_tok": 2, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_attention_heads, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "router_aux_loss_factor": 0.02, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_dense": False,
    }


def test_released_format_loads_in_both_implementations(tmp_path):
    ours = make_ours()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in ours.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(released_config(ours.config), indent=2))

    loaded = TimeMoeForPrediction.from_pretrained(tmp_path)  # no remote code in the directory
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, state[k].float(), atol=0, rtol=0)

    for src in REMOTE_CODE_DIR.glob("*.py"):  # as on the hub: the repository carries its own code
        shutil.copyfile(src, tmp_path / src.name)
    theirs = load_remote(tmp_path, dtype=torch.float32)
    x_BT = random_walks(2, 64)
    with torch.no_grad():
        for pa, pb in zip(loaded(x_BT).predictions, theirs(x_BT).predictions):
            torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    assert_forecasts_match(loaded, theirs, random_walks(2, 200), horizons=(96,))

    # Default dtype: the checkpoint's own (bf16), as a serving stack would run it.
    theirs_bf16 = load_remote(tmp_path)
    assert theirs_bf16.dtype == torch.bfloat16
    context_BT = random_walks(2, 200)
    a, b = loaded.forecast(context_BT, 96), theirs_bf16.forecast(context_BT, 96)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.1  # bf16 rounding, not a different model


def test_remote_config_round_trip(tmp_path):
    ours = make_ours(num_key_value_heads=2)
    ours.save_pretrained(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    for key, value in ours.config.to_hf_dict().items():
        if key in ("auto_map", "torch_dtype", "architectures"):
            continue
        assert getattr(cfg, key) == value, key
    with pytest.raises(ValueError, match="horizon_lengths"):
        type(cfg)(horizon_lengths=[8, 1])


REPO = Path(__file__).resolve().parents[1]
REFERENCE_CODE = REPO / "bench" / "reference" / "modeling_time_moe.py"
TRANSFORMERS_4_40 = REPO / ".cache" / "transformers-4.40"


def export_with_reference(model, tmp_path):
    """The export, and a copy of it whose modeling code is the released-style reference (distinct folder names:
    transformers caches remote modules by folder name)."""
    exported, reference = tmp_path / f"{tmp_path.name}_exported", tmp_path / f"{tmp_path.name}_reference"
    model.save_pretrained(exported)
    shutil.copytree(exported, reference)
    shutil.copyfile(REFERENCE_CODE, reference / "modeling_time_moe.py")
    return exported, reference


def mixed_contexts():
    """Four rows at very different scales, one of them constant."""
    context_BT = random_walks(4, 300)
    context_BT[1] = context_BT[1] * 1e4 - 3e5
    context_BT[2] = context_BT[2] * 1e-3
    context_BT[3] = 7.25
    return context_BT


def normalised_error(a_BH, b_BH, context_BT) -> float:
    """Largest difference in units of each row's own scale (what the model sees; 1 for a constant row)."""
    std_B1 = context_BT.std(dim=1, keepdim=True, unbiased=False)
    std_B1 = torch.where(std_B1 > 1e-8, std_B1, torch.ones_like(std_B1))
    return ((a_BH - b_BH).abs() / std_B1).max().item()


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"num_key_value_heads": 1, "use_dense": True}],
                         ids=["moe", "gqa", "mqa-dense"])
def test_exported_equals_library_and_released_reference(tmp_path, overrides):
    ours = make_ours(**overrides)
    exported_dir, reference_dir = export_with_reference(ours, tmp_path)
    exported, reference = load_remote(exported_dir), load_remote(reference_dir)
    context_BT = mixed_contexts()
    for horizon in (1, 7, 96, 720):
        want = reference.forecast(context_BT, horizon)
        for name, got in (("exported", exported.forecast(context_BT, horizon)),
                          ("library", ours.forecast(context_BT, horizon))):
            assert got.shape == (4, horizon)
            err = normalised_error(got, want, context_BT)
            assert err <= 1e-5, f"{name}, horizon {horizon}: {err:.2e} of the rows' scale from the reference"
        assert torch.isfinite(want).all()
        # The roll-out must move, or matching would be trivial: forecasts leave the context's mean.
        moved = (want - context_BT.mean(1, keepdim=True)) / context_BT.std(1, keepdim=True).clamp_min(1e-8)
        assert moved[:3].abs().max() > 0.01
    with torch.no_grad():  # the public forward too: every head at every position, the loss and the router logits
        x_BT = random_walks(2, 77)
        a = exported(input_ids=x_BT, labels=torch.roll(x_BT, -1, 1))
        b = reference(input_ids=x_BT, labels=torch.roll(x_BT, -1, 1))
    for pa, pb in zip(a.predictions, b.predictions):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    for la, lb in zip(a.router_logits, b.router_logits):
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)


def test_padded_rows_and_several_horizons_in_one_roll_out_match_the_reference(tmp_path):
    """The library's roll-out of left-padded rows of different lengths, all horizons at once, against the reference
    forecasting each row alone."""
    from timemoe_train.model.rollout import roll_out

    ours = make_ours()
    _, reference_dir = export_with_reference(ours, tmp_path)
    reference = load_remote(reference_dir)
    lengths = [300, 120, 300, 33]
    context_BT = mixed_contexts()
    padded_BT = torch.where(torch.arange(300) >= 300 - torch.tensor(lengths)[:, None], context_BT, float("nan"))
    got = roll_out(ours, padded_BT, (96, 192, 720), torch.tensor(lengths))
    for i, n in enumerate(lengths):
        row_1T = context_BT[i:i + 1, 300 - n:]
        for horizon in (96, 192, 720):
            err = normalised_error(got[horizon][i:i + 1], reference.forecast(row_1T, horizon), row_1T)
            assert err <= 1e-5, f"row {i} ({n} points), horizon {horizon}: {err:.2e}"


def test_packed_rows_with_a_block_mask_match_the_training_forward(tmp_path):
    """bench/train_step.py's reference arm: packed rows handed to the released-style code as the released code takes
    them (a 4D block-diagonal causal mask, positions restarting per piece) compute what our training forward computes
    from the sequence ids, at every real point."""
    from timemoe_train.train.synthetic import SyntheticDataConfig

    ours = make_ours()
    _, reference_dir = export_with_reference(ours, tmp_path)
    reference = load_remote(reference_dir)
    batch = next(iter(SyntheticDataConfig(max_length=64, max_pieces=4).build_train_loader(0, 1, 4, 4)))
    ids_BT = batch["sequence_ids"]
    assert (ids_BT.amax(1) >= 2).any() and (ids_BT < 0).any()  # pieces and padding: a causal mask would differ
    B, T = ids_BT.shape
    allowed_BTS = torch.zeros(B, T, T, dtype=torch.bool)
    positions_BT = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            allowed_BTS[b, t, [s for s in range(t + 1) if ids_BT[b, s] == ids_BT[b, t]]] = True
            run_start = t
            while run_start > 0 and ids_BT[b, run_start - 1] == ids_BT[b, t]:
                run_start -= 1
            positions_BT[b, t] = t - run_start
    with torch.no_grad():
        a = ours(batch["inputs"], sequence_ids_BT=ids_BT)
        b = reference(input_ids=batch["inputs"], attention_mask=allowed_BTS[:, None].float(), position_ids=positions_BT)
    real_BT = ids_BT >= 0
    for pa, pb in zip(a.predictions, b.predictions):
        torch.testing.assert_close(pa[real_BT], pb[real_BT], atol=1e-5, rtol=1e-5)
    for la, lb in zip(a.router_logits, b.router_logits):
        torch.testing.assert_close(la[real_BT.flatten()], lb[real_BT.flatten()], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4D attention_mask"):
        reference(input_ids=batch["inputs"], attention_mask=allowed_BTS[:, None, :, :-1].float())


def test_padding_mask_and_cache_match_the_reference(tmp_path):
    exported_dir, reference_dir = export_with_reference(make_ours(num_key_value_heads=2), tmp_path)
    exported, reference = load_remote(exported_dir), load_remote(reference_dir)
    x_BT = random_walks(2, 40)
    mask_BT = torch.ones(2, 40)
    mask_BT[0, :5] = 0  # left padding
    with torch.no_grad():
        a = exported(input_ids=x_BT[:, :30], attention_mask=mask_BT[:, :30])
        b = reference(input_ids=x_BT[:, :30], attention_mask=mask_BT[:, :30])
        a2 = exported(input_ids=x_BT[:, 30:], attention_mask=mask_BT, past_key_values=a.cache)
        b2 = reference(input_ids=x_BT[:, 30:], attention_mask=mask_BT, past_key_values=b.cache)
    for pa, pb in zip(a.predictions + a2.predictions, b.predictions + b2.predictions):
        torch.testing.assert_close(pa[1], pb[1], atol=1e-5, rtol=1e-5)  # the unpadded row
        torch.testing.assert_close(pa[0, 5:], pb[0, 5:], atol=1e-5, rtol=1e-5)  # the padded one, after its padding


LOAD_AND_FORECAST = textwrap.dedent("""
    import sys
    sys.modules["timemoe_train"] = sys.modules["data_prep"] = None  # the export must not need them
    import numpy as np, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    context = torch.from_numpy(np.load(sys.argv[2]))
    np.save(sys.argv[3], model.forecast(context, 96).numpy())
    print(transformers.__version__)
""")


@pytest.mark.parametrize("major", ["installed", "4.40"])
def test_export_loads_and_forecasts_under_both_transformers_majors(tmp_path, major):
    env = dict(os.environ)
    if major == "4.40":
        if not (TRANSFORMERS_4_40 / "transformers").is_dir():
            pytest.skip(f"transformers 4.40 is not installed in {TRANSFORMERS_4_40} (`make test` puts it there)")
        env["PYTHONPATH"] = os.pathsep.join([str(TRANSFORMERS_4_40), env.get("PYTHONPATH", "")])
    ours = make_ours()
    export_dir = tmp_path / f"{tmp_path.name}_export"
    ours.save_pretrained(export_dir)
    context_BT = mixed_contexts()
    np.save(tmp_path / "context.npy", context_BT.numpy())
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_FORECAST, str(export_dir), str(tmp_path / "context.npy"),
                           str(tmp_path / "forecast.npy")], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = proc.stdout.strip().splitlines()[-1]
    assert version.startswith("4.40.") if major == "4.40" else version == transformers.__version__
    got = torch.from_numpy(np.load(tmp_path / "forecast.npy"))
    assert normalised_error(got, ours.forecast(context_BT, 96), context_BT) <= 1e-5


def test_gradients_through_the_export_equal_the_reference(tmp_path):
    """Fine-tuning through the export's forward: its in-place SwiGLU and residual sums must leave autograd's
    gradients those of the reference (an expert that got no token: None there, zeros here)."""
    exported_dir, reference_dir = export_with_reference(make_ours(num_key_value_heads=2), tmp_path)
    exported, reference = load_remote(exported_dir).train(), load_remote(reference_dir).train()
    x_BT = random_walks(2, 40)
    for model in (exported, reference):
        model(input_ids=x_BT, labels=torch.roll(x_BT, -1, 1)).loss.backward()
    for (name, a), (_, b) in zip(exported.named_parameters(), reference.named_parameters()):
        assert a.grad is not None, name
        want = torch.zeros_like(a) if b.grad is None else b.grad
        torch.testing.assert_close(a.grad, want, atol=1e-5, rtol=1e-4, msg=name)
    assert any(p.grad.abs().max() > 0 for p in exported.model.layers[0].self_attn.parameters())
