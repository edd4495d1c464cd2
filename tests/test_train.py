"""The trainer's pieces in one process: config groups and their errors, schedule, data layout, guard, checkpoint
file safety, FLOP counting, secret scrubbing, the DeepSpeed expert marker."""

from __future__ import annotations

import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from timemoe_train.checkpoint import CheckpointError
from timemoe_train.model import TimeMoeConfig
from timemoe_train.train.__main__ import CONFIG_DIR, make_trainer, run_config
from timemoe_train.checkpoint import load_checkpoint_file
from timemoe_train.train.config import OptimConfig, TrainConfigError
from timemoe_train.train.engine import learning_rate
from timemoe_train.train.guard import NonFiniteGuard, TrainingDiverged
from timemoe_train.train.metrics import segment_square_sum, train_flops
from timemoe_train.train.monitor import scrub
from timemoe_train.train.synthetic import SyntheticDataConfig

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str, data: str = "synthetic"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["checkpoint.dir=unused", *([f"data={data}"] if data else []),
                                           *overrides])


def test_learning_rate_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [learning_rate(s, cfg, max_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear, step 0 already moves
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine: the mean of lr and min_lr
    assert lrs[35] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("world, overrides, message", [
    (6, ["parallel=expert", "parallel.expert_parallel_size=3"],
     "parallel.expert_parallel_size=3 does not divide num_experts=4"),
    (3, ["parallel=expert"], "parallel.expert_parallel_size=2 does not divide the world size 3"),
    (2, ["trainer.global_batch_size=10", "trainer.micro_batch_size=4"],
     "trainer.global_batch_size=10: must be a multiple of trainer.micro_batch_size (4) x data-parallel size (2) = 8"),
    (2, ["parallel=expert", "parallel.zero_stage=3"], "parallel.zero_stage=3: ZeRO-3"),
    (1, ["data.max_length=8192"], "data.max_length=8192: exceeds model.max_position_embeddings=4096"),
    (2, ["parallel=expert", "model.moe_impl=native"], "use parallel=expert (model.moe_impl=megatron"),
    (1, ["optim.min_lr=0.1"], "optim.min_lr=0.1"),
    (1, ["model.num_experts_per_tok=5"], "model: TimeMoeConfig.num_experts_per_tok=5: exceeds num_experts=4"),
], ids=["ep-experts", "ep-world", "batch", "zero3-ep", "window", "ep-native", "min-lr", "model"])
def test_bad_config_fails_before_any_process_group_work(monkeypatch, world, overrides, message):
    import torch.distributed as dist

    import timemoe_train.parallel as parallel

    def forbidden(*args, **kwargs):
        raise AssertionError("process-group work started before the config was validated")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setattr(parallel, "init_parallel", forbidden)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = composed(*overrides)
    with pytest.raises(TrainConfigError) as info:
        make_trainer(cfg, "unused")
    assert message in str(info.value)


def broken_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step00000007")


NO_FLOCK = """import errno, fcntl, os
def flock(fd, operation):  # as on Lustre mounted without -o flock
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
fcntl.flock = flock
"""


def no_flock(run_dir: Path) -> dict:
    """The run directory's file system has no flock: a sitecustomize for the command's process."""
    (run_dir.parent / "no_flock").mkdir()
    (run_dir.parent / "no_flock" / "sitecustomize.py").write_text(NO_FLOCK)
    return {"PYTHONPATH": os.pathsep.join([str(run_dir.parent / "no_flock"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("args, message, setup", [
    (["data=synthetic", "parallel=expert", "parallel.expert_parallel_size=3"],
     "parallel.expert_parallel_size=3 does not divide the world size 2", None),
    ([], "TrainConfigError: data.path: no value given; add data.path=... to the command", None),
    (["data.path=/no/such/corpus"], "TrainConfigError: data.path='/no/such/corpus': no such directory", None),
    (["data=synthetic", "trainer.max_stepz=5"],
     "timemoe-train: trainer.max_stepz: no such key in trainer; did you mean trainer.max_steps", None),
    (["data=synthetic", "trainer.max_steps=abc"], "TrainConfigError: trainer.max_steps='abc': must be int", None),
    (["data.path=.", "data.packing=maybe"], "TrainConfigError: data.packing='maybe': must be bool", None),
    (["data=synthetic", "model.apply_aux_loss=nope"], "TrainConfigError: model.apply_aux_loss='nope': must be bool",
     None),
    (["data.path=[a,b]"], "TrainConfigError: data.path=['a', 'b']: must be str", None),
    (["data=synthetic", "optim.betas=[0.9,x]"], "optim.betas=[0.9, 'x']: must be tuple[float, float]", None),
    (["model=huge"], "Could not find 'model/huge'", None),
    (["data=synthetic", "data.max_length=48", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
      "logger=none"], "names 'step00000007', which is not a directory", broken_checkpoint),
    (["data=synthetic"], "LockUnsupported: {run}: its file system cannot flock {run}/.lock (Function not implemented), "
     "the lock that keeps a second launch off a live run: mount it with flock (Lustre: -o flock), or choose a run.dir "
     "on a file system that has it (local disk, NFS with its lock daemon)", no_flock),
], ids=["layout", "no-data-path", "missing-data-path", "unknown-key", "bad-type", "bad-bool", "bad-model-bool",
         "list-for-str", "bad-tuple", "unknown-group", "checkpoint", "no-flock"])
def test_each_user_error_is_one_line_with_exit_status_2(tmp_path, args, message, setup):
    env = (setup(tmp_path / "run") if setup else None) or {}
    message = message.format(run=tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "timemoe_train.train", *args, f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"},
                               **({"WORLD_SIZE": "2"} if "parallel=expert" in args else {}), **env})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("timemoe-train:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    if not setup:  # a config error is found before anything starts, and leaves nothing behind
        assert "starting a new run" not in proc.stdout
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line", [line for line in (CONFIG_DIR / "train.yaml").read_text().splitlines()
                                  if line.startswith("#   ") and "timemoe" in line])
def test_the_examples_in_train_yaml_compose_and_validate(line, tmp_path):
    """The commands train.yaml shows, with their process count, pass every check that needs no data."""
    words = line[1:].split()
    nproc = int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words else 1
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # data.path=data/prepared is relative
    try:
        run_config(composed(*overrides, data=None)).validate(world_size=nproc)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("size", ["tiny", "base", "large", "ultra"])
def test_model_groups_are_the_presets(size):
    model = run_config(composed(f"model={size}")).model
    assert model == TimeMoeConfig.preset(size)


def test_paper_recipe_experiment():
    run = run_config(composed("experiment=timemoe_paper", "data.path=/data/time300b", data=None))
    o, t = run.optim, run.trainer
    assert (o.lr, tuple(o.betas), o.weight_decay, o.warmup_steps) == (1e-3, (0.9, 0.95), 0.1, 10_000)
    assert (t.max_steps, t.global_batch_size, t.precision) == (100_000, 1024, "bf16")
    assert run.data.max_length == 4096 and run.data.packing
    assert (run.model.hidden_size, run.model.router_aux_loss_factor) == (384, 0.02)
    large = run_config(composed("experiment=timemoe_paper", "data.path=x", "model=large", data=None))
    assert large.model.hidden_size == 768  # the model group can still be chosen on the command line


def test_demo_experiment_is_tiny_ep2_on_two_processes(tmp_path):
    run = run_config(composed("experiment=demo", f"data.path={tmp_path}", data=None))
    run.validate(world_size=2)
    assert run.parallel.expert_parallel_size == 2 and run.model.hidden_size == 64
    # windows cover the 512-point context plus the 64 points forecast() appends before its second step
    assert run.data.max_length == 576 and run.data.path == str(tmp_path)
    assert run.model.huber_delta == 0.1 and run.data.normalization == "window"
    assert run.data.normalization_excludes == max(run.model.horizon_lengths)  # the longest head's targets
    assert run.model.embed_init_std == 1.0  # fan-in scale: no plateau while the embedding learns the input's sign


def test_synthetic_stream_is_the_same_for_every_data_parallel_layout():
    cfg = SyntheticDataConfig(max_length=24, seed=3)

    def global_batches(dp_size, micro, steps=2):
        loaders = [iter(cfg.build_train_loader(r, dp_size, 8, micro)) for r in range(dp_size)]
        per_step = 8 // (dp_size * micro)
        return [torch.cat([next(it)["inputs"] for it in loaders for _ in range(per_step)])
                if dp_size == 1 else
                torch.cat([torch.cat([next(it)["inputs"] for _ in range(per_step)]) for it in loaders])
                for _ in range(steps)]

    one, two = global_batches(1, 2), global_batches(2, 4)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    loader = cfg.build_train_loader(0, 1, 8, 2)
    it = iter(loader)
    next(it), next(it)
    resumed = cfg.build_train_loader(0, 1, 8, 2)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed))["inputs"], next(it)["inputs"])


def test_synthetic_rows_are_packed_with_consistent_masks():
    from timemoe_train.train.synthetic import synthetic_row

    for i in range(20):
        row = synthetic_row(SyntheticDataConfig(max_length=64), i)
        seq, mask = row["sequence_ids"], row["loss_mask"].bool()
        assert torch.equal(row["labels"][:-1], row["inputs"][1:])
        # a label counts only when it continues the same piece; padding (-1) never counts
        assert not mask[seq < 0].any()
        assert torch.equal(mask[:-1], (seq[1:] == seq[:-1]) & (seq[:-1] >= 0))


def test_guard_sees_nonfinite_gradients_and_stops_after_max_bad_steps():
    layer = nn.Linear(3, 1)
    guard = NonFiniteGuard(layer, max_bad_steps=2, device="cpu", micro_batches=1)
    layer(torch.ones(1, 3)).sum().backward()
    assert guard.grads_nonfinite.item() == 0
    layer(torch.tensor([[1.0, float("inf"), 0.0]])).sum().backward()
    assert guard.grads_nonfinite.item() == 1
    guard.reset()
    assert guard.grads_nonfinite.item() == 0
    guard.record(True)
    guard.check(1)
    guard.record(False)
    guard.record(True)
    guard.check(3)
    guard.record(True)
    with pytest.raises(TrainingDiverged, match="non-finite for 2 steps in a row"):
        guard.check(4)
    assert guard.skipped_total == 3


class Pickled:
    pass


def test_checkpoint_files_load_only_tensors_and_only_from_the_checkpoint_dir(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step1").mkdir(parents=True)
    torch.save({"w": torch.ones(2), "step": 3}, root / "step1" / "ok.pt")
    assert load_checkpoint_file(root / "step1" / "ok.pt", root)["step"] == 3
    torch.save({"w": torch.ones(2)}, tmp_path / "outside.pt")
    with pytest.raises(PermissionError, match="outside the checkpoint directory"):
        load_checkpoint_file(tmp_path / "outside.pt", root)
    (root / "step1" / "link.pt").symlink_to(tmp_path / "outside.pt")
    with pytest.raises(PermissionError):
        load_checkpoint_file(root / "step1" / "link.pt", root)
    torch.save({"obj": Pickled()}, root / "step1" / "code.pt")
    with pytest.raises(CheckpointError, match="test_train.Pickled"):
        load_checkpoint_file(root / "step1" / "code.pt", root)


def test_flop_counting():
    # two rows: sequences of 3 and 2 points then padding; one of 4 points
    seq = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    assert segment_square_sum(seq).item() == 9 + 4 + 16
    # activated parameters per point, as the paper reports them (50M, 200M, 1.1B)
    for size, paper in (("base", 50e6), ("large", 200e6), ("ultra", 1.1e9)):
        assert abs(TimeMoeConfig.preset(size).active_params_per_token / paper - 1) < 0.05, size
    c = TimeMoeConfig.preset("tiny")
    assert train_flops(c, 10, 0) == 60 * c.active_params_per_token
    assert train_flops(c, 0, 100) == 12 * c.num_hidden_layers * c.hidden_size * 100


def test_scrub_removes_secret_values():
    cfg = {"logger": {"wandb": {"api_key": "k", "project": "p"}}, "x": [{"hf_token": "t"}], "auth": {"u": 1}}
    assert scrub(cfg) == {"logger": {"wandb": {"api_key": "***", "project": "p"}}, "x": [{"hf_token": "***"}],
                          "auth": "***"}


def test_expert_marker_exposes_megatron_experts_to_deepspeed():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    from timemoe_train.model import TimeMoeForPrediction
    from timemoe_train.parallel import destroy_parallel, init_parallel
    from timemoe_train.train.module import TrainModule

    config = TimeMoeConfig.preset("tiny", moe_impl="megatron")
    init_parallel()
    try:
        model = TimeMoeForPrediction(config)
        module = TrainModule(model, ep_size=1, with_markers=True)
    finally:
        destroy_parallel()
    markers = list(module.expert_markers)
    assert len(markers) == config.num_hidden_layers and all(isinstance(m, MoE) for m in markers)
    experts = {n for n, p in model.named_parameters() if ".experts.local_experts." in n}
    assert {v[len("model."):] for v in module.expert_aliases.values()} == experts
    assert all(is_moe_param(p) and p.group_name == "ep_size_1"
               for n, p in model.named_parameters() if n in experts)
    assert not any(is_moe_param(p) for n, p in model.named_parameters() if n not in experts)  # shared expert too
    state = module.state_dict()
    assert not any(k.startswith("model.") and ".local_experts." in k for k in state)
    assert not any(k.endswith("_extra_state") for k in state)
    # the marker names are what DeepSpeed's per-expert checkpoint code looks for
    assert any(".deepspeed_moe.experts.deepspeed_experts.0.linear_fc1.weight" in k for k in state)
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    module.load_model_state(zeros)
    assert all(p.abs().sum() == 0 for p in model.parameters())
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_model_state({k: v for k, v in zeros.items() if "deepspeed_experts.1." not in k})


def test_help_and_version_say_what_the_tool_is(tmp_path):
    cli = [sys.executable, "-m", "timemoe_train.train"]
    helped = subprocess.run([*cli, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert helped.returncode == 0, helped.stderr
    text = helped.stdout
    assert text.startswith("timemoe-train: pretrain a Time-MoE model")
    assert "\nmodel: base, large, tiny, ultra\n" in text  # the shared model keys are no option of their own
    for part in ("== Config groups (group=option) ==", "== Runs and resuming ==", "== Signals and exit status ==",
                 "SIGUSR1", "already at step", "Exit 2: a user error"):
        assert part in text, part
    versioned = subprocess.run([*cli, "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert versioned.returncode == 0
    assert re.fullmatch(r"timemoe-train \S+ \(torch \S+, deepspeed \S+, megatron-core \S+, hydra-core \S+\)\n",
                        versioned.stdout), versioned.stdout


def test_starting_weights_are_the_same_at_every_expert_parallel_size():
    """Each rank draws only what it owns, each tensor from its own (seed, name) generator: the ranks of EP=2 and
    EP=4 together hold exactly EP=1's weights, bit for bit, and a rank never holds another's experts."""
    from timemoe_train.model.hf_layout import expected_shapes
    from timemoe_train.train.module import initial_hf_state

    config = TimeMoeConfig.preset("tiny")
    full = initial_hf_state(config, 7, None)
    assert full.keys() == expected_shapes(config).keys()
    assert not torch.equal(full["model.layers.0.ffn_layer.experts.0.gate_proj.weight"],
                           full["model.layers.0.ffn_layer.experts.1.gate_proj.weight"])
    assert not torch.equal(full["model.layers.0.self_attn.q_proj.weight"],
                           initial_hf_state(config, 8, None)["model.layers.0.self_attn.q_proj.weight"])
    for ep_size in (2, 4):
        per_rank = config.num_experts // ep_size
        union = {}
        for ep_rank in range(ep_size):
            state = initial_hf_state(config, 7, None, ep_rank, ep_size)
            experts = {int(k.split(".experts.")[1].split(".")[0]) for k in state if ".experts." in k}
            assert experts == set(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
            union.update(state)
        assert union.keys() == full.keys()
        assert all(torch.equal(union[k], v) for k, v in full.items()), ep_size


def test_init_from_hf_reads_only_the_owned_tensors(tmp_path, monkeypatch):
    from safetensors import safe_open

    from timemoe_train.model import TimeMoeForPrediction
    from timemoe_train.model import hf_layout
    from timemoe_train.train.module import initial_hf_state

    config = TimeMoeConfig.preset("tiny")
    saved = TimeMoeForPrediction(config)
    saved.save_pretrained(tmp_path)
    read = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(hf_layout, "safe_open", Spy)
    state = initial_hf_state(config, 0, str(tmp_path), ep_rank=1, ep_size=2)
    assert sorted(read) == sorted(state)
    assert not any(f".experts.{e}." in k for k in read for e in range(config.num_experts // 2))
    expected = saved.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in state.items())
