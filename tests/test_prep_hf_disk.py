"""timemoe-prep --source hf-disk: trees of `save_to_disk` directories in GIFT-Eval's layout (its benchmark, its
pretraining corpus, LOTSA) become a corpus, each variate a series, frequency kept, domain from the folder or a map."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gift_layout import save_config, walk
from test_prep_time300b import folder_bytes, read_all

from data_prep import CleanOptions, PrepError, PrepOptions, load_manifest, prepare
from data_prep.sources import HfDiskSource

PREP = str(Path(sys.executable).parent / "timemoe-prep")
OPTIONS = PrepOptions(workers=1, progress=False, clean=CleanOptions(min_length=3), shard_bytes=4096)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """GIFT-Eval-style configurations, one under a domain folder, plus a file that is not data."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    hourly = [walk(rng, 200), walk(rng, 150)]
    hourly[1][40] = np.nan  # a one-point gap: cleaning interpolates it
    multi = [np.stack([walk(rng, 120), walk(rng, 120, level=5)]), np.stack([walk(rng, 90), walk(rng, 90)])]
    weekly = [walk(rng, 60)]
    solar = [walk(rng, 300)]
    save_config(root, "electricity/15T", hourly, "15T")
    save_config(root, "ett1/H", multi, "H", ids=["ett_a", "ett_b"])
    save_config(root, "m4_weekly", weekly, "W-SAT")
    save_config(root, "energy/solar/10T", solar, "10min")
    (root / "README.md").write_text("GIFT-Eval\n")
    return root, {"hourly": hourly, "multi": multi, "weekly": weekly, "solar": solar}


def test_every_variate_is_a_series_with_its_frequency_and_domain(tree, tmp_path):
    root, data = tree
    manifest = prepare(HfDiskSource(str(root)), tmp_path / "out", OPTIONS)
    got = read_all(tmp_path / "out")
    assert sorted(manifest["datasets"]) == ["energy/solar/10T", "other/electricity/15T", "other/ett1/H",
                                            "other/m4_weekly"]
    assert {k: v["freq"] for k, v in manifest["datasets"].items()} == {
        "energy/solar/10T": "10min", "other/electricity/15T": "15T", "other/ett1/H": "H", "other/m4_weekly": "W-SAT"}
    assert np.array_equal(got["other/electricity/15T/item_0"][2], data["hourly"][0])
    gap = got["other/electricity/15T/item_1"][2]
    assert np.array_equal(np.delete(gap, 40), np.delete(data["hourly"][1], 40)) and np.isfinite(gap[40])
    for row, item in enumerate(("ett_a", "ett_b")):
        for dim in range(2):
            assert np.array_equal(got[f"other/ett1/H/{item}_dim{dim}"][2], data["multi"][row][dim])
    assert got["other/ett1/H/ett_a_dim1"][:2] == ("other", "ett1/H")
    assert np.array_equal(got["energy/solar/10T/item_0"][2], data["solar"][0])
    assert manifest["totals"]["sequences"] == 2 + 4 + 1 + 1
    assert manifest["cleaning"]["rules"]["interpolated_gaps"] == {"count": 1, "points": 1}
    assert manifest["ignored"] == [{"file": str(root / "README.md"), "reason": "not in a save_to_disk directory"}]


def test_a_domain_map_places_datasets_by_path_or_leading_folder(tree, tmp_path):
    root, _ = tree
    mapping = tmp_path / "domains.json"
    mapping.write_text(json.dumps({"electricity": "energy", "ett1/H": "nature", "*": "finance"}))
    manifest = prepare(HfDiskSource(str(root), domain_map=str(mapping)), tmp_path / "out", OPTIONS)
    assert sorted(manifest["datasets"]) == ["energy/electricity/15T", "finance/energy/solar/10T",
                                            "finance/m4_weekly", "nature/ett1/H"]
    assert manifest["source"]["domain_map"] == {"electricity": "energy", "ett1/H": "nature", "*": "finance"}
    mapping.write_text(json.dumps({"electricity": "energy"}))
    with pytest.raises(PrepError, match=r"domains.json: dataset = 'energy/solar/10T': no key covers it"):
        HfDiskSource(str(root), domain_map=str(mapping)).discover()
    mapping.write_text(json.dumps({"electricity": "power"}))
    with pytest.raises(PrepError, match=r"domains.json: electricity = 'power': not a domain"):
        HfDiskSource(str(root), domain_map=str(mapping)).discover()


def test_one_directory_given_itself_is_one_dataset(tree, tmp_path):
    root, data = tree
    prepare(HfDiskSource(str(root / "m4_weekly"), domain="finance"), tmp_path / "out", OPTIONS)
    assert np.array_equal(read_all(tmp_path / "out")["finance/m4_weekly/item_0"][2], data["weekly"][0])


def test_workers_1_and_2_give_identical_bytes(tree, tmp_path):
    root, _ = tree
    prepare(HfDiskSource(str(root)), tmp_path / "one", OPTIONS)
    prepare(HfDiskSource(str(root)), tmp_path / "two", PrepOptions(**{**OPTIONS.__dict__, "workers": 2}))
    assert len(load_manifest(tmp_path / "one")["shards"]) > 1
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def save_rows(root: Path, name: str, rows: dict) -> None:
    import datasets

    datasets.Dataset.from_dict(rows).save_to_disk(str(root / name))


@pytest.mark.parametrize("name, rows, fragment", [
    ("text", {"item_id": ["a"], "target": [["1.5", "x"]]},
     "text: target = 'list<item: string>': expected a list of numbers or a list of such lists"),
    ("hole", {"item_id": ["a", "b"], "target": [[1.0, 2.0, 3.0], None]}, "hole: row 1: target = None: missing"),
    ("cube", {"target": [[[[1.0]]]]}, "cube: target = 'list<item: list<item: list<item: double>>>': expected"),
    ("untargeted", {"item_id": ["a"], "values": [[1.0, 2.0]]}, "untargeted: target = None: missing; the fields"),
    ("freqs", {"freq": ["h", "D"], "target": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]},
     "freqs: freq = ['D', 'h']: rows disagree"),
])
def test_bad_input_names_the_directory_field_and_value(tmp_path, name, rows, fragment):
    save_rows(tmp_path / "in", name, rows)
    with pytest.raises(PrepError, match=re.escape(f"{tmp_path / 'in' / name}: {fragment.split(': ', 1)[1]}")):
        prepare(HfDiskSource(str(tmp_path / "in")), tmp_path / "out", OPTIONS)


def test_an_unreadable_directory_is_named(tmp_path):
    (tmp_path / "in" / "broken").mkdir(parents=True)
    for marker in ("state.json", "dataset_info.json"):
        (tmp_path / "in" / "broken" / marker).write_text("{")
    with pytest.raises(PrepError, match=re.escape(f"{tmp_path / 'in' / 'broken'}: save_to_disk = ")):
        prepare(HfDiskSource(str(tmp_path / "in")), tmp_path / "out", OPTIONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match=re.escape(f"{tmp_path / 'empty'}: --input = ") + ".*holds no save_to_disk"):
        HfDiskSource(str(tmp_path / "empty")).discover()


def test_the_installed_command_from_outside_the_checkout(tree, tmp_path):
    root, _ = tree
    common = ["--source", "hf-disk", "--input", str(root), "--workers", "1", "--no-progress"]
    run = lambda *args: subprocess.run([PREP, *common, *args], cwd=tmp_path, capture_output=True, text=True)  # noqa: E731
    done = run("--output", "corpus")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("corpus: ") and "8 sequences" in done.stdout
    (tmp_path / "map.json").write_text(json.dumps({"electricity": "grid"}))
    bad = run("--output", "again", "--domain-map", "map.json")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "timemoe-prep: error: map.json: electricity = 'grid': not a domain; choose one of " \
                                 "energy, finance, healthcare, nature, other, sales, synthetic, transport, web"
