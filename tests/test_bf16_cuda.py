"""bf16 training follows fp32 training: 50 steps of the tiny model through the real Trainer (DeepSpeed engine with
fp32 gradient accumulation and reduction, ZeRO-1), same data and seed, loss curves compared.

Tolerance: every step's bf16 loss within 5% of the fp32 loss, the mean relative gap over the 50 steps under 2%,
and bf16 still learning (its last ten steps' mean loss below its first ten's). Runs on CUDA (bench/gpu_check.sh);
`loss_curves("cpu")` runs the same comparison on a CPU by hand."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

STEPS = 50


def loss_curve(precision: str, device: str, run_dir: Path) -> list[float]:
    from hydra import compose, initialize_config_dir

    from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer

    overrides = ["model=tiny", "data=synthetic", "data.max_length=256", "logger=none", "logger.progress=false",
                 f"trainer.max_steps={STEPS}", "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
                 f"trainer.precision={precision}", f"trainer.device={device}", "optim.warmup_steps=5",
                 "checkpoint.save_at_end=false", "checkpoint.interval=0", f"checkpoint.dir={run_dir}/ckpt"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = make_trainer(cfg, run_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_curves(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = loss_curve("fp32", device, Path(tmp) / "fp32")
        bf16 = loss_curve("bf16", device, Path(tmp) / "bf16")
    return torch.tensor(fp32), torch.tensor(bf16)


def check_curves(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    assert len(fp32) == len(bf16) == STEPS
    gap = (bf16 - fp32).abs() / fp32.abs()
    assert gap.max() < 0.05, f"worst step {int(gap.argmax()) + 1}: bf16 {bf16[gap.argmax()]:.4f} vs fp32 " \
                             f"{fp32[gap.argmax()]:.4f}"
    assert gap.mean() < 0.02, f"mean relative gap {gap.mean():.4f}"
    assert bf16[-10:].mean() < bf16[:10].mean()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_loss_curve_follows_fp32_on_cuda():
    check_curves(*loss_curves("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_step_makes_no_host_sync():
    """A training step of the model on packed rows, as the GPU path runs it (bf16, FlexAttention block mask, the
    grouped expert GEMM on SM90+, fused AdamW), under torch.cuda.set_sync_debug_mode("error"): any host sync in the
    block mask, forward, loss, backward or optimizer step raises. The first step compiles (and may sync)."""
    from test_attention import batch, random_packing
    from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

    torch.manual_seed(0)
    config = TimeMoeConfig.preset("tiny", hidden_size=128, num_attention_heads=4, num_experts=8, attn_impl="auto",
                                  expert_gemm="auto")
    model = TimeMoeForPrediction(config).cuda().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    steps = [{k: v.cuda() for k, v in batch(random_packing(4, 512, gen), gen).items()} for _ in range(2)]
    for inputs in steps:
        inputs["inputs_BT"], inputs["labels_BT"] = inputs["inputs_BT"].bfloat16(), inputs["labels_BT"].bfloat16()
    losses = []
    for i, inputs in enumerate(steps):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if i else 0)
        try:
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        losses.append(loss.float().item())
    assert all(torch.isfinite(torch.tensor(losses)))
