"""`timemoe-eval gift-eval` as users run it (the installed command, from outside the checkout) on real series in
GIFT-Eval's layout (data_prep.gift_suite: weekly W-SAT with NaN, half-hourly and hourly, a multivariate daily
series with NaN in its labels, monthly), against the reference GIFT-Eval's notebooks assemble (tests/gift_reference:
its Dataset's windows from gluonts, the released-style Time-MoE code through trust_remote_code, statsforecast's
StatsForecast, gluonts' evaluate_model)."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gluonts")
pytest.importorskip("statsforecast")

import gift_reference as ref  # noqa: E402
from data_prep.gift_eval import find_configurations  # noqa: E402
from data_prep.gift_suite import build, save_configuration  # noqa: E402
from timemoe_train.evaluate.cli import main as eval_main  # noqa: E402
from timemoe_train.model import TimeMoeConfig, TimeMoeForPrediction  # noqa: E402

COMMAND = str(Path(sys.executable).parent / "timemoe-eval")
REFERENCE_CODE = Path(__file__).resolve().parents[1] / "bench" / "reference" / "modeling_time_moe.py"
CONTEXT = 256
# The leaderboard's columns, in its order (results/*/all_results.csv in GIFT-Eval's repository).
LEADERBOARD_COLUMNS = [
    "dataset", "model", "eval_metrics/MSE[mean]", "eval_metrics/MSE[0.5]", "eval_metrics/MAE[0.5]",
    "eval_metrics/MASE[0.5]", "eval_metrics/MAPE[0.5]", "eval_metrics/sMAPE[0.5]", "eval_metrics/MSIS",
    "eval_metrics/RMSE[mean]", "eval_metrics/NRMSE[mean]", "eval_metrics/ND[0.5]",
    "eval_metrics/mean_weighted_sum_quantile_loss", "domain", "num_variates"]
SUITE_KEYS = ["co2/W/short", "elnino/M/short", "msft/D/short", "sunspots/M/short", "taylor/30T/long",
              "taylor/30T/medium", "taylor/30T/short", "taylor/H/long", "taylor/H/medium", "taylor/H/short"]
HEADLINE = "GIFT-Eval over {n} configs: MASE {mase:.4f}, CRPS {crps:.4f} (geometric mean relative to seasonal naive)"


def tiny_model(seed: int = 0, nan_heads: bool = False) -> TimeMoeForPrediction:
    torch.manual_seed(seed)
    model = TimeMoeForPrediction(TimeMoeConfig.preset("tiny")).eval()
    with torch.no_grad():  # O(1) forecasts that depend on the context (see test_remote_code.make_ours)
        for head in model.lm_heads:
            head.out_layer.weight.normal_(0.0, 0.3)
            if nan_heads:
                head.out_layer.weight[0, 0] = float("nan")
    return model


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    build(root)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The export, and a copy whose modeling code is the released-style reference (distinct folder names:
    transformers caches remote modules by folder name)."""
    folder = tmp_path_factory.mktemp("models")
    export, reference = folder / "gift_export", folder / "gift_reference_code"
    tiny_model().save_pretrained(export)
    shutil.copytree(export, reference)
    shutil.copyfile(REFERENCE_CODE, reference / "modeling_time_moe.py")
    return export, reference


# One thread per process everywhere: a float sum split over another number of threads may differ in its last bit,
# and the runs compared here (one process, two, resumed) are then bit for bit the same.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, cwd):
    return subprocess.run([COMMAND, "gift-eval", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=1200, env=ENV)


@pytest.fixture(scope="module")
def scored(suite, exported, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    out = work / "out"
    proc = run(exported[0], "--data", suite, "--out", out, "--context-length", CONTEXT, "--batch-size", 4, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["dataset"]: r for r in csv.DictReader(f)}


def test_outputs_in_the_leaderboards_layout(scored):
    out, proc = scored
    with open(out / "all_results.csv", newline="") as f:
        assert next(csv.reader(f)) == LEADERBOARD_COLUMNS
    with open(out / "seasonal_naive" / "all_results.csv", newline="") as f:
        assert next(csv.reader(f)) == LEADERBOARD_COLUMNS
    model, naive = table(out / "all_results.csv"), table(out / "seasonal_naive" / "all_results.csv")
    assert sorted(model) == sorted(naive) == SUITE_KEYS
    assert {r["model"] for r in model.values()} == {"gift_export"}
    assert {r["model"] for r in naive.values()} == {"Seasonal_Naive"}
    assert model["msft/D/short"]["num_variates"] == "4" and model["co2/W/short"]["domain"] == "Other"
    record = json.loads((out / "config.json").read_text())
    assert record == {"model": "gift_export", "model_type": "pretrained", "model_dtype": "float32",
                      "testdata_leakage": "unknown", "replication_code_available": "Yes"}
    # no training_data.json: it refuses to guess, and says how to find out
    assert "gift-eval: testdata_leakage: not declared: " in proc.stderr and "timemoe-prep audit" in proc.stderr
    summary = (out / "summary.md").read_text()
    for section in ("## Per domain", "## Per term", "## Per frequency", "| taylor/30T/long |"):
        assert section in summary
    assert (out / "summary.png").stat().st_size > 10_000
    log = (out / "gift_eval.log").read_text().splitlines()
    assert len(log) == 10 and all(k in "\n".join(log) for k in SUITE_KEYS)  # progress, also in a file
    assert sum("gift-eval: [" in line for line in proc.stderr.splitlines()) == 10


def test_scores_equal_gift_evals_pipeline_with_the_released_code(scored, suite, exported):
    """Every configuration and term: MASE and CRPS (mean_weighted_sum_quantile_loss) within 1e-3 of GIFT-Eval's
    windows + the released-style code + gluonts' evaluate_model."""
    import transformers

    released = transformers.AutoModelForCausalLM.from_pretrained(exported[1], trust_remote_code=True).eval()
    ours = table(scored[0] / "all_results.csv")
    for config in find_configurations(suite):
        for term in config.terms:
            test_data, pl, freq = ref.gift_test_data(config.path, config.name, term)
            want = ref.gift_evaluate(ref.ReleasedTimeMoe(released, pl, CONTEXT), test_data, freq)
            got = ours[f"{config.name}/{term}"]
            for metric in ("MASE[0.5]", "mean_weighted_sum_quantile_loss"):
                rel = abs(float(got[f"eval_metrics/{metric}"]) / want[metric] - 1)
                assert rel <= 1e-3, f"{config.name}/{term} {metric}: {got[f'eval_metrics/{metric}']} vs {want[metric]}"


def test_seasonal_naive_equals_statsforecast_as_the_notebook_wraps_it(scored, suite):
    naive = table(scored[0] / "seasonal_naive" / "all_results.csv")
    for config in find_configurations(suite):
        for term in config.terms:
            test_data, pl, freq = ref.gift_test_data(config.path, config.name, term)
            want = ref.gift_evaluate(ref.NotebookSeasonalNaive(pl, ref.seasonality(freq), freq), test_data, freq)
            for metric, value in want.items():
                got = float(naive[f"{config.name}/{term}"][f"eval_metrics/{metric}"])
                assert math.isclose(got, value, rel_tol=1e-9), f"{config.name}/{term} {metric}: {got} vs {value}"


def test_headline_is_the_geometric_mean_of_the_two_tables(scored):
    out, proc = scored
    model, naive = table(out / "all_results.csv"), table(out / "seasonal_naive" / "all_results.csv")

    def gmean(column):
        ratios = np.array([float(model[k][column]) / float(naive[k][column]) for k in model])
        return float(np.exp(np.log(ratios).mean()))

    want = HEADLINE.format(n=10, mase=gmean("eval_metrics/MASE[0.5]"),
                           crps=gmean("eval_metrics/mean_weighted_sum_quantile_loss"))
    assert proc.stdout.strip().splitlines()[-1] == want
    assert want in (out / "summary.md").read_text()


def test_interrupted_run_resumes_skipping_configurations_done(scored, suite, exported, tmp_path):
    """Killed (-9) after a few configurations: the tables hold whole rows; the re-run scores only the rest and ends
    with the tables of an uninterrupted run."""
    out = tmp_path / "out"
    args = [COMMAND, "gift-eval", exported[0], "--data", suite, "--out", out, "--context-length", CONTEXT,
            "--batch-size", 4]
    first = subprocess.Popen(list(map(str, args)), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)
    log = out / "gift_eval.log"
    deadline = time.monotonic() + 900
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = table(out / "all_results.csv")
    assert 2 <= len(done) < 10, "the kill came too late to leave work for the re-run"
    second = run(exported[0], "--data", suite, "--out", out, "--context-length", CONTEXT, "--batch-size", 4,
                 cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = len(table(out / "seasonal_naive" / "all_results.csv").keys() & done.keys())
    assert f"{skipped} of 10 configurations already in {out}: skipped" in second.stderr
    assert sum("gift-eval: [" in line for line in second.stderr.splitlines()) == 10 - skipped
    for name in ("all_results.csv", "seasonal_naive/all_results.csv"):
        assert table(out / name) == table(scored[0] / name)
    assert second.stdout.strip().splitlines()[-1] == scored[1].stdout.strip().splitlines()[-1]


def test_a_different_setting_into_the_same_out_is_refused(scored, suite, exported, capsys, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(scored[0], out)
    before = (out / "all_results.csv").read_text()
    code = eval_main(["gift-eval", str(exported[0]), "--data", str(suite), "--out", str(out), "--context-length",
                      "64", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "context_length=256" in err[0] and "use another --out" in err[0]
    assert (out / "all_results.csv").read_text() == before


@pytest.mark.parametrize("case", ["data", "configs", "terms", "model", "frequency", "extra"])
def test_bad_input_is_one_line_exit_2(case, suite, exported, tmp_path, capsys, monkeypatch):
    args = [str(exported[0]), "--data", str(suite), "--out", str(tmp_path / "out"), "--no-progress"]
    expect = {"data": "no such folder", "configs": "--configs nope", "terms": "--terms week",
              "model": "model directory not found", "frequency": "no prediction length for unit 'B'",
              "extra": "pip install 'timemoe-train[gift]'"}[case]
    if case == "data":
        args[2] = str(tmp_path / "missing")
    elif case == "configs":
        args += ["--configs", "co2/W,nope"]
    elif case == "terms":
        args += ["--terms", "short,week"]
    elif case == "model":
        args[0] = str(tmp_path / "no_model")
    elif case == "frequency":
        save_configuration(tmp_path / "biz" / "B", [{"item_id": "a", "start": "2000-01-03", "freq": "B",
                                                     "target": np.arange(300.0)}])
        args[2] = str(tmp_path / "biz")
        capsys.readouterr()  # the save's progress bar
    else:
        monkeypatch.setitem(sys.modules, "statsforecast", None)
    code = eval_main(["gift-eval", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("timemoe-eval: error: ") and expect in err[0], err
    assert not (tmp_path / "out" / "all_results.csv").exists()


def test_bad_input_from_the_installed_command(tmp_path, exported):
    proc = run(exported[0], "--data", tmp_path / "missing", "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"timemoe-eval: error: {tmp_path / 'missing'}: --data = '{tmp_path / 'missing'}': no such folder (GIFT-Eval's "
        "layout: one save_to_disk directory per configuration)"]


def test_a_nan_forecast_is_an_error_naming_configuration_and_item(suite, tmp_path, capsys):
    broken = tiny_model(nan_heads=True).save_pretrained(tmp_path / "broken")
    code = eval_main(["gift-eval", str(broken), "--data", str(suite), "--out", str(tmp_path / "out"), "--configs",
                      "msft/D", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("timemoe-eval: error: msft/D/short: the model's forecast of item msft_dim0")
    assert not (tmp_path / "out" / "all_results.csv").exists()


@pytest.mark.slow
def test_two_processes_equal_one(scored, suite, exported, tmp_path):
    out = tmp_path / "out"
    proc = run(exported[0], "--data", suite, "--out", out, "--context-length", CONTEXT, "--batch-size", 4,
               "--nproc-per-node", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("all_results.csv", "seasonal_naive/all_results.csv"):
        assert table(out / name) == table(scored[0] / name)
    assert proc.stdout.strip().splitlines()[-1] == scored[1].stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_an_error_in_the_processes_is_said_once(suite, tmp_path):
    """A NaN forecast met by both processes: the launcher relays one line, exit 2."""
    broken = tiny_model(nan_heads=True).save_pretrained(tmp_path / "broken")
    proc = run(broken, "--data", suite, "--out", tmp_path / "out", "--configs", "taylor/H", "--terms", "short",
               "--nproc-per-node", 2, "--no-progress", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if "timemoe-eval: error:" in line]
    assert proc.returncode == 2 and lines == [
        lines[0]] and "taylor/H/short: the model's forecast of item taylor" in lines[0], proc.stderr[-3000:]
