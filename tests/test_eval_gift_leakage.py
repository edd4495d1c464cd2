"""GIFT-Eval's `testdata_leakage`, decided from a model's training_data.json (as timemoe-export writes it) and the
content of the configurations scored: "No" only for a corpus guarded against (or audited clean for) that very data,
"Yes" when an audit found its windows, and no guess otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from gift_layout import save_config, walk
from test_prep_gift_leakage import OPTIONS, bench, corpus_input  # noqa: F401  (fixtures)

from data_prep import PrepOptions, prepare
from data_prep.audit import audit, write_audit
from data_prep.leakage import LeakageGuard
from data_prep.sources import HfDiskSource
from timemoe_train.evaluate.leakage import gift_eval_leakage
from timemoe_train.export.training_data import write_training_data


def exported(tmp_path: Path, corpus: Path, name: str) -> Path:
    """A model directory whose training_data.json timemoe-export wrote for a run trained on `corpus`."""
    run, model = tmp_path / f"{name}-run", tmp_path / name
    run.mkdir()
    model.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(corpus)}}))
    write_training_data(run, model)
    return model


@pytest.fixture(scope="module")
def corpora(bench, corpus_input, tmp_path_factory):  # noqa: F811
    root, _ = bench
    folder, _ = corpus_input
    out = tmp_path_factory.mktemp("corpora")
    guard = LeakageGuard(gift_eval=(str(root),))
    prepare(HfDiskSource(str(folder)), out / "guarded", PrepOptions(**{**OPTIONS.__dict__, "guard": guard}))
    prepare(HfDiskSource(str(folder)), out / "open", OPTIONS)
    rng = np.random.default_rng(3)
    save_config(out / "clean-in", "walks", [walk(rng, 700) for _ in range(4)], "D")
    prepare(HfDiskSource(str(out / "clean-in")), out / "clean", OPTIONS)
    return out


def test_guarded_audited_held_and_unknown(bench, corpora, tmp_path):  # noqa: F811
    root, _ = bench
    guarded = gift_eval_leakage(exported(tmp_path, corpora / "guarded", "guarded"), root)
    assert guarded["testdata_leakage"] == "No"
    assert guarded["configs"] == {"ett1/D": "guarded", "m4_weekly": "guarded", "solar/D": "guarded"}
    assert guarded["line"].startswith(f"testdata_leakage: No: corpus {corpora / 'guarded'} holds no test window of "
                                      "the 3 scored configurations (3 prepared with --exclude-benchmark")

    unaudited = exported(tmp_path, corpora / "open", "unaudited")
    undecided = gift_eval_leakage(unaudited, root)
    assert undecided["testdata_leakage"] is None and set(undecided["configs"].values()) == {"unknown"}
    assert f"`timemoe-prep audit CORPUS --benchmark gift-eval:{root}`" in undecided["line"]

    write_audit(corpora / "open", audit(corpora / "open", (str(root),), progress=False))
    held = gift_eval_leakage(exported(tmp_path, corpora / "open", "held"), root)  # exported after the audit
    assert held["testdata_leakage"] == "Yes"
    assert held["line"] == (f"testdata_leakage: Yes: the audit of corpus {corpora / 'open'} found test windows of 3 "
                            "of the 3 scored configurations in it (ett1/D 3 of 18, m4_weekly 1 of 5, solar/D 4 of 12)")
    # audited after the export: read from the corpus the record names
    assert gift_eval_leakage(unaudited, root)["testdata_leakage"] == "Yes"

    write_audit(corpora / "clean", audit(corpora / "clean", (str(root),), progress=False))
    clean = gift_eval_leakage(exported(tmp_path, corpora / "clean", "clean"), root, ["solar/D"])
    assert clean == {"testdata_leakage": "No", "configs": {"solar/D": "audited"},
                     "line": f"testdata_leakage: No: corpus {corpora / 'clean'} holds no test window of the 1 scored "
                             "configurations (1 audited and none of their windows found; matched by the content of "
                             "their test windows)"}


def test_guarded_against_other_data_is_no_answer(bench, corpora, tmp_path):  # noqa: F811
    root, data = bench
    model = exported(tmp_path, corpora / "guarded", "guarded")
    other = tmp_path / "other"
    shutil.copytree(root, other)
    edited = [series.copy() for series in data["solar/D"]]
    edited[2][-1] += 1  # one test point differs: other data, whatever its name
    shutil.rmtree(other / "solar" / "D")
    save_config(other, "solar/D", edited, "D")
    decided = gift_eval_leakage(model, other)
    assert decided["testdata_leakage"] is None
    assert decided["configs"] == {"ett1/D": "guarded", "m4_weekly": "guarded", "solar/D": "unknown"}
    assert "neither guarded against nor audited for 1 of the 3 scored configurations (solar/D)" in decided["line"]
    assert gift_eval_leakage(model, other, ["m4_weekly"])["testdata_leakage"] == "No"  # the part that is the same


def test_no_record_a_model_object_and_a_fine_tuned_model(bench, corpora, tmp_path):  # noqa: F811
    root, _ = bench
    bare = tmp_path / "released"
    bare.mkdir()
    assert gift_eval_leakage(bare, root)["line"].startswith(f"testdata_leakage: not declared: "
                                                            f"{bare / 'training_data.json'}: none")
    assert gift_eval_leakage(object(), root)["testdata_leakage"] is None
    base = json.loads((exported(tmp_path, corpora / "guarded", "base") / "training_data.json").read_text())
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    record = {"split": {"file": "mine.csv"}, "fine_tuned_from": {"training_data": base}}
    (tuned / "training_data.json").write_text(json.dumps(record))
    decided = gift_eval_leakage(tuned, root)
    assert decided["testdata_leakage"] is None and "fine-tuned on mine.csv" in decided["line"]
    write_audit(corpora / "open", audit(corpora / "open", (str(root),), progress=False))
    leaky = json.loads((exported(tmp_path, corpora / "open", "leaky") / "training_data.json").read_text())
    (tuned / "training_data.json").write_text(json.dumps({**record, "fine_tuned_from": {"training_data": leaky}}))
    decided = gift_eval_leakage(tuned, root)
    assert decided["testdata_leakage"] == "Yes"
    assert decided["line"].startswith("testdata_leakage: Yes: its base model's training data: the audit of corpus")
