"""torchrun worker for the trainer tests: compose the Hydra config from `configs/` with the given overrides, train,
then optionally
  --forecast FILE      forecast a fixed context with the training model (all ranks take part) -> FILE (rank 0)
  --grad-check FILE    compare expert gradients after one more micro-batch with a single-process reference -> FILE
  --hang-after STEP    after publishing checkpoint STEP, each rank touches `<checkpoint.dir>/hanging.<rank>` and
                       sleeps (to be killed by pid: every rank writes it to `<run-dir>/pid.<rank>` at start)
  --nan-steps 2,4      rank 0 feeds a NaN input point in these steps (1-based), the other ranks clean data

    torchrun --nproc_per_node 2 tests/dist/train_run.py --run-dir D [options] -- key=value ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer
from timemoe_train.train.trainer import Trainer

FORECAST_CONTEXT = 5.0 + torch.randn(3, 48, generator=torch.Generator().manual_seed(7)).cumsum(1)


def hang_after(step: int, trainer: Trainer) -> None:
    checkpointer = trainer.checkpointer
    save = checkpointer.save

    def save_then_hang(at_step, *args, **kwargs):
        path = save(at_step, *args, **kwargs)
        if at_step == step:  # published on every rank (an async save's background write included): wait for SIGKILL
            checkpointer.wait()
            (checkpointer.root / f"hanging.{dist.get_rank()}").touch()
            while True:
                time.sleep(1)
        return path

    checkpointer.save = save_then_hang


def poison(trainer: Trainer, steps: set[int]) -> None:
    model_inputs = trainer._model_inputs

    def poisoned(batch):
        inputs = model_inputs(batch)
        if dist.get_rank() == 0 and trainer.step + 1 in steps:
            inputs["inputs_BT"] = inputs["inputs_BT"].clone()
            inputs["inputs_BT"][0, 5] = float("nan")
        return inputs

    trainer._model_inputs = poisoned


def forecast(trainer: Trainer, out: Path) -> None:
    model = trainer.module.model.eval()
    prediction = model.forecast(FORECAST_CONTEXT, 40)  # 32 + 8: two heads, KV cache, every rank's experts
    if dist.get_rank() == 0:
        torch.save(prediction, out)


def grad_check(trainer: Trainer, out: Path) -> None:
    """Expert gradients of one micro-batch per rank: the engine's, and the local ones reduced by hand over the
    expert-data-parallel group (right) and over all ranks (wrong), each against a one-process reference."""
    from moe_parity import hf_grads  # next to this script, which is on sys.path

    from timemoe_train.export.cli import gather_hf_state
    from timemoe_train.model import TimeMoeForPrediction
    from timemoe_train.train.trainer import build_loader

    lay, run, engine, module = trainer.layout, trainer.run, trainer.engine, trainer.module
    t, config = run.trainer, run.model
    step_batches = []  # every rank's next micro-batch, rebuilt from the deterministic synthetic stream
    for rank in range(lay.dp_size):
        loader = build_loader(run.data, rank, lay.dp_size, t.global_batch_size, t.micro_batch_size)
        loader.load_state_dict(trainer.loader.state_dict())
        step_batches.append(next(iter(loader)))

    def model_inputs(b):
        return {"inputs_BT": b["inputs"], "labels_BT": b["labels"], "loss_mask_BT": b["loss_mask"],
                "sequence_ids_BT": b["sequence_ids"]}

    def expert_grads(model):  # this rank's experts, under their released (global) names
        grads = hf_grads(model, config, lay.ep_rank, lay.ep_size)
        return {k: g.clone() for k, g in grads.items() if ".experts." in k}

    mine = model_inputs(step_batches[lay.dp_rank])
    module.train()
    engine.zero_grad()
    module(**mine).loss.backward()  # plain autograd: local gradients, no reduction
    local = expert_grads(module.model)
    right, wrong = {}, {}
    for k, g in local.items():
        right[k], wrong[k] = g.clone(), g.clone()
        dist.all_reduce(right[k], group=lay.expert_dp_group)
        dist.all_reduce(wrong[k])
        right[k] /= lay.dp_size
        wrong[k] /= lay.dp_size
    engine.zero_grad()
    engine.backward(engine(**mine).loss)  # the engine's reduction (ZeRO-0 leaves it in .grad)
    reduced = expert_grads(module.model)

    root = Path(run.checkpoint.dir)
    _, hf, _ = gather_hf_state(root / (root / "latest").read_text().strip(), root)
    reference = TimeMoeForPrediction(dataclasses.replace(config, moe_impl="native"))
    reference.load_state_dict(hf, strict=True)
    torch.stack([reference(**model_inputs(b)).loss for b in step_batches]).mean().backward()
    ref_hf = hf_grads(reference, config)
    scale = max(ref_hf[k].abs().max().item() for k in local)

    def worst(grads):
        return max((grads[k] - ref_hf[k]).abs().max().item() for k in grads) / scale

    result = torch.tensor([worst(reduced), worst(right), worst(wrong)])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"engine": result[0].item(), "expert_dp_group": result[1].item(),
                                   "all_ranks": result[2].item(), "experts_checked": len(local)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--forecast", type=Path)
    parser.add_argument("--grad-check", type=Path)
    parser.add_argument("--hang-after", type=int)
    parser.add_argument("--nan-steps", type=lambda s: {int(x) for x in s.split(",")}, default=set())
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.run_dir) / f"pid.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    trainer = make_trainer(cfg, args.run_dir)
    if args.hang_after:
        hang_after(args.hang_after, trainer)
    if args.nan_steps:
        poison(trainer, args.nan_steps)
    trainer.fit()
    if args.forecast:
        forecast(trainer, args.forecast)
    if args.grad_check:
        grad_check(trainer, args.grad_check)
    trainer.close()


if __name__ == "__main__":
    main()
