"""Every attention path (model/attention.py) against the dense block-diagonal mask: outputs and gradients of the
whole model, fp32, within 1e-5, on packings built to hit the edge cases (single-point pieces, padding, rows of one
full window, grouped KV heads), and the KV-cached forecast. CUDA variants run only where a GPU is present."""

import pytest
import torch

from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction
from timemoe_train.model.attention import AttentionLayout, block_causal_mask, packed_positions

TOL = dict(atol=1e-5, rtol=1e-5)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(**kw):
    return TimeMoeConfig.preset("tiny", **{"num_attention_heads": 4, "num_key_value_heads": 2, **kw})


def random_packing(B: int, T: int, gen: torch.Generator, max_pieces: int = 12) -> torch.Tensor:
    """[B, T] sequence ids: random piece lengths (1-point pieces likely), -1 padding at some row ends, one row of a
    single full window."""
    rows = []
    for b in range(B):
        if b == 0:
            rows.append(torch.zeros(T, dtype=torch.long))
            continue
        cuts = torch.randperm(T - 1, generator=gen)[: int(torch.randint(1, max_pieces, (), generator=gen))] + 1
        cuts = torch.sort(cuts).values
        ids = torch.zeros(T, dtype=torch.long)
        ids[cuts] = 1
        ids = ids.cumsum(0)
        if b % 2:  # the last piece becomes padding
            ids[ids == ids[-1]] = -1
        rows.append(ids)
    ids = torch.stack(rows)
    ids[1, 5:8] = torch.tensor([40, 41, 42])  # three single-point pieces in a row
    ids[1, 8:] = torch.where(ids[1, 8:] >= 0, ids[1, 8:] + 100, -1)  # each id one run, as the loader writes them
    return ids


def batch(ids_BT: torch.Tensor, gen: torch.Generator) -> dict:
    x_BT = torch.randn(ids_BT.shape, generator=gen)
    labels_BT = torch.randn(ids_BT.shape, generator=gen)
    loss_mask_BT = (ids_BT >= 0) & torch.cat([ids_BT[:, 1:] == ids_BT[:, :-1], torch.zeros_like(ids_BT[:, :1],
                                                                                               dtype=torch.bool)], 1)
    return dict(inputs_BT=x_BT, labels_BT=labels_BT, loss_mask_BT=loss_mask_BT, sequence_ids_BT=ids_BT)


def twin(impl: str, device="cpu", **kw) -> tuple[TimeMoeForPrediction, TimeMoeForPrediction]:
    torch.manual_seed(0)
    ref = TimeMoeForPrediction(config(attn_impl="dense_mask", **kw)).to(device)
    other = TimeMoeForPrediction(config(attn_impl=impl, **kw)).to(device)
    other.load_state_dict(ref.state_dict())
    return ref, other


def run(model, inputs: dict):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_same(ref_model, model, inputs, valid_BT=None):
    ref_out, ref_grads = run(ref_model, inputs)
    out, grads = run(model, inputs)
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    for p, q in zip(out.predictions, ref_out.predictions):
        if valid_BT is not None:
            p, q = p[valid_BT], q[valid_BT]
        torch.testing.assert_close(p, q, **TOL)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_varlen_equals_dense_mask_on_random_packings(seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = batch(random_packing(4, 96, gen), gen)
    assert_same(*twin("varlen"), inputs)


def test_varlen_single_point_pieces_and_all_padding_rows():
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.arange(40), torch.full((40,), -1), torch.tensor([0] * 39 + [1])])
    assert_same(*twin("varlen"), batch(ids, gen))


def test_varlen_with_padding_between_pieces():
    """The synthetic source leaves -1 points where it drops a piece: padding runs then differ from the dense mask's
    (which lets one padding run see another), real points and all gradients do not."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.tensor([[0] * 10 + [-1] * 3 + [2] * 12 + [-1] * 5, [0] * 30])
    assert_same(*twin("varlen"), batch(ids, gen), valid_BT=ids >= 0)


def test_paths_equal_dense_mask_on_full_windows_without_gqa():
    gen = torch.Generator().manual_seed(3)
    inputs = batch(torch.zeros(3, 64, dtype=torch.long), gen)
    for impl in ("varlen", "causal"):
        assert_same(*twin(impl, num_key_value_heads=4), inputs)


def test_causal_on_unpacked_rows_differs_only_at_padding():
    """data.packing=false: one piece per row then padding; the padding outputs are no loss's business."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.zeros(3, 50, dtype=torch.long)
    ids[1, 30:] = -1
    ids[2, 45:] = -1
    assert_same(*twin("causal"), batch(ids, gen), valid_BT=ids >= 0)


def test_kv_cached_forecast_is_the_same_on_every_path():
    torch.manual_seed(6)
    context = torch.randn(2, 70) * 3 + 1
    ref = TimeMoeForPrediction(config(attn_impl="dense_mask")).eval()
    want = ref.forecast(context, 100)  # 64 + 32 + 4 new points after the context: multi-point cached steps
    for impl in ("varlen", "causal", "auto"):
        model = TimeMoeForPrediction(config(attn_impl=impl)).eval()
        model.load_state_dict(ref.state_dict())
        torch.testing.assert_close(model.forecast(context, 100), want, **TOL)


def test_varlen_buckets_cover_every_position_once():
    gen = torch.Generator().manual_seed(7)
    ids = random_packing(5, 300, gen, max_pieces=40)
    layout = AttentionLayout.build("varlen", ids, 300, 0, torch.device("cpu"))
    buckets = layout.buckets
    # Every position is read back from a slot that gathered that very position.
    assert torch.equal(buckets.index_P[buckets.source_N], torch.arange(ids.numel()))
    assert len(set(buckets.source_N.tolist())) == ids.numel()
    # Bucketed cost stays within the ladder's 1.56x of Σ len² (plus nothing quadratic in T).
    exact = sum(float((torch.unique_consecutive(row, return_counts=True)[1].float() ** 2).sum()) for row in ids)
    padded = sum(R * L**2 for R, L in buckets.shapes)
    assert exact <= padded <= 1.5625 * exact


def test_varlen_on_one_run_per_row_is_plain_causal():
    ids = torch.tensor([[4] * 16, [-1] * 16])
    assert AttentionLayout.build("varlen", ids, 16, 0, torch.device("cpu")).impl == "causal"


def test_positions_restart_and_mask_stays_inside_runs():
    ids = torch.tensor([[3, 3, 3, -1, 7, 7]])
    assert packed_positions(ids).tolist() == [[0, 1, 2, 0, 0, 1]]
    mask = block_causal_mask(ids)[0]
    assert mask[5].tolist() == [False, False, False, False, True, True]


def test_flex_on_cpu_training_is_refused_by_name():
    model = TimeMoeForPrediction(config(attn_impl="flex"))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="attn_impl='flex' on cpu"):
        model(**batch(torch.zeros(1, 8, dtype=torch.long), gen))


def test_flex_forward_on_cpu_equals_dense_mask():
    """CPU has FlexAttention's forward (not its backward): the document mask is checked here, gradients on CUDA."""
    gen = torch.Generator().manual_seed(8)
    inputs = batch(random_packing(3, 128, gen), gen)
    ref, flex = twin("flex")
    with torch.no_grad():
        want, got = ref(**inputs), flex(**inputs)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    for p, q in zip(got.predictions, want.predictions):
        torch.testing.assert_close(p, q, **TOL)


@pytest.fixture
def strict_fp32():
    """No TF32 inside this test: the 1e-5 comparison is of fp32 kernels."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("impl", ["flex", "varlen", "auto"])
def test_cuda_paths_equal_dense_mask(impl, strict_fp32):
    gen = torch.Generator().manual_seed(9)
    inputs = {k: v.cuda() for k, v in batch(random_packing(4, 256, gen), gen).items()}
    assert_same(*twin(impl, device="cuda"), inputs)


@pytest.mark.cuda
@cuda
def test_cuda_causal_on_full_windows_equals_dense_mask(strict_fp32):
    gen = torch.Generator().manual_seed(10)
    inputs = {k: v.cuda() for k, v in batch(torch.zeros(2, 256, dtype=torch.long), gen).items()}
    assert_same(*twin("causal", device="cuda"), inputs)
