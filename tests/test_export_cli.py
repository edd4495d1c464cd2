"""timemoe-export on checkpoint directories written here by hand in the trainer's layout (DeepSpeed's file names,
the marker names of the expert files, megatron's fused fc1 = [gate_proj; up_proj] from SPEC/ENGINE-NOTES), so the
gathering is checked against the released weights it started from. Real trainer checkpoints are exported in
test_train_parallel.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_prep_leakage import benchmark_and_planted

from data_prep import PrepOptions, prepare
from data_prep.leakage import default_guard
from data_prep.sources import TableSource
from timemoe_train.export.cli import export
from timemoe_train.export.cli import main as export_main
from timemoe_train.checkpoint import CheckpointError
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction

MARKER = "expert_markers.{layer}.deepspeed_moe.experts.deepspeed_experts.{expert}.{linear}.weight"
LOCAL = "model.model.layers.{layer}.ffn_layer.experts.local_experts.{expert}.{linear}.weight"


def released_weights(config: TimeMoeConfig) -> dict:
    torch.manual_seed(0)
    return TimeMoeForPrediction(config).state_dict()


def write_megatron_checkpoint(root, hf: dict, config: TimeMoeConfig, ep_size: int, tag: str = "step00000010"):
    """What an EP=`ep_size` megatron run saves: shared weights once, one file per (layer, global expert)."""
    d = root / tag
    d.mkdir(parents=True)
    shared = {}
    for key, value in hf.items():
        head, _, rest = key.partition("ffn_layer.")
        if not rest:
            shared["model." + key] = value
        elif rest == "gate.weight":
            shared[f"model.{head}ffn_layer.router.weight"] = value
        elif rest == "shared_expert_gate.weight":
            shared[f"model.{head}ffn_layer.shared_experts.gate_weight"] = value
        elif rest.startswith("shared_expert."):
            proj = rest.split(".")[1]
            if proj == "down_proj":
                shared[f"model.{head}ffn_layer.shared_experts.linear_fc2.weight"] = value
            elif proj == "gate_proj":
                up = hf[key.replace("gate_proj", "up_proj")]
                shared[f"model.{head}ffn_layer.shared_experts.linear_fc1.weight"] = torch.cat([value, up])
    torch.save({"module": shared}, d / "mp_rank_00_model_states.pt")
    per_rank = config.num_experts // ep_size
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_experts):
            p = f"model.layers.{layer}.ffn_layer.experts.{e}."
            fc1 = torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]])
            torch.save({MARKER.format(layer=layer, expert=e, linear="linear_fc1"): fc1,
                        MARKER.format(layer=layer, expert=e, linear="linear_fc2"): hf[p + "down_proj.weight"]},
                       d / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
    aliases = {MARKER.format(layer=layer, expert=i, linear=lin): LOCAL.format(layer=layer, expert=i, linear=lin)
               for layer in range(config.num_hidden_layers) for i in range(per_rank)
               for lin in ("linear_fc1", "linear_fc2")}
    model = {**config.__dict__, "moe_impl": "megatron"}
    (d / "meta.json").write_text(json.dumps({"step": int(tag.removeprefix("step")), "world_size": ep_size,
                                             "ep_size": ep_size, "zero_stage": 1,
                                             "model": model, "precision": "fp32", "expert_aliases": aliases}))
    (root / "latest").write_text(tag)
    return d


@pytest.fixture
def config():
    return TimeMoeConfig.preset("tiny")


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_export_gathers_every_expert_of_every_rank(tmp_path, config, ep_size):
    hf = released_weights(config)
    write_megatron_checkpoint(tmp_path / "ckpt", hf, config, ep_size)
    export(tmp_path / "ckpt", tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(hf)
    assert all(torch.equal(exported[k], hf[k]) for k in hf)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_experts"] == 4


def test_export_picks_latest_or_the_given_tag(tmp_path, config):
    old, new = released_weights(config), {k: v + 1 for k, v in released_weights(config).items()}
    write_megatron_checkpoint(tmp_path / "ckpt", old, config, 2, tag="step00000001")
    write_megatron_checkpoint(tmp_path / "ckpt", new, config, 2, tag="step00000002")
    export(tmp_path / "ckpt", tmp_path / "latest")
    export(tmp_path / "ckpt", tmp_path / "first", tag="step00000001")
    export(tmp_path / "ckpt" / "step00000001", tmp_path / "direct")
    key = "model.layers.1.ffn_layer.experts.3.up_proj.weight"
    assert torch.equal(load_file(tmp_path / "latest" / "model.safetensors")[key], new[key])
    for out in ("first", "direct"):
        assert torch.equal(load_file(tmp_path / out / "model.safetensors")[key], old[key])


def test_missing_expert_file_is_named(tmp_path, config):
    d = write_megatron_checkpoint(tmp_path / "ckpt", released_weights(config), config, 2)
    (d / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing \(3\): model.layers.1.ffn_layer.experts.3.down_proj"):
        export(tmp_path / "ckpt", tmp_path / "hf")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, config):
    d = write_megatron_checkpoint(tmp_path / "ckpt", released_weights(config), config, 2)
    torch.save({"module": {}, "payload": subprocess.Popen}, d / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="refused: it pickles .*Popen"):
        export(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_on_a_directory_that_is_no_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "timemoe_train.export.cli", str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{tmp_path}: neither a checkpoint directory" in proc.stderr


def test_export_records_the_corpus_and_the_benchmarks_its_guard_kept_out(tmp_path, config, capsys):
    bench, planted = benchmark_and_planted(tmp_path, np.random.default_rng(5))
    table = tmp_path / "train.csv"
    pd.DataFrame({"timestamp": range(900), "planted": planted, "other": np.arange(900.0) % 24}).to_csv(table,
                                                                                                      index=False)
    corpus = tmp_path / "corpus"
    prepare(TableSource("csv", str(table)), corpus,
            PrepOptions(workers=1, progress=False, guard=default_guard((str(bench),))))
    d = write_megatron_checkpoint(tmp_path / "ckpt", released_weights(config), config, 1)
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(corpus), "max_length": 64}}))
    export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert (f"training_data.json: corpus {corpus}; benchmarks kept out by content: ETTh1.csv, my_eval.csv; "
            "1 series excluded") in capsys.readouterr().out
    record = json.loads((tmp_path / "hf" / "training_data.json").read_text())
    assert record["corpus"] == str(corpus)
    assert record["manifest_sha256"] == hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    guard = record["leakage_guard"]
    assert {b["file"]: b["sha256"] for b in guard["benchmarks"]}["my_eval.csv"] == hashlib.sha256(
        bench.read_bytes()).hexdigest()
    assert guard["excluded"] == 1 and guard["name_pattern"] and "rule" in guard

    shutil.rmtree(corpus)  # an export elsewhere: the record says what is known, and the export goes on
    record = json.loads((export(tmp_path / "ckpt", tmp_path / "elsewhere") / "training_data.json").read_text())
    assert record["corpus"] == str(corpus) and record["manifest_sha256"] is None and record["leakage_guard"] is None
    assert record["note"].startswith(f"{corpus / 'manifest.json'}: not readable at export")
    (d / "config.yaml").unlink()
    record = json.loads((export(tmp_path / "ckpt", tmp_path / "noconfig") / "training_data.json").read_text())
    assert record["corpus"] is None and "config.yaml: no data.path to read" in record["note"]


def test_cli_says_the_step_writes_files_everyone_can_read_and_overwrites_only_with_force(tmp_path, config):
    write_megatron_checkpoint(tmp_path / "ckpt", released_weights(config), config, 2, tag="step00000007")
    out = tmp_path / "hf"
    cli = [sys.executable, "-m", "timemoe_train.export.cli", str(tmp_path / "ckpt"), str(out)]
    umask = "umask 077 && exec " + " ".join(cli)  # a private umask: the export is still readable by everyone
    first = subprocess.run(["sh", "-c", umask], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == f"exported step 7 ({tmp_path / 'ckpt' / 'step00000007'}) to {out}"
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o755"

    weights = (out / "model.safetensors").read_bytes()
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.splitlines() == [f"timemoe-export: {out}: not empty (config.json, configuration_time_moe.py, "
                                         "model.safetensors, modeling_time_moe.py, ...); pass --force to replace an "
                                         "earlier export, or choose another directory"]
    assert (out / "model.safetensors").read_bytes() == weights
    forced = subprocess.run([*cli, "--force"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0 and forced.stdout.startswith("exported step 7 "), forced.stderr
