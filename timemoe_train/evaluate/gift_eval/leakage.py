"""The leaderboard's `testdata_leakage` for a model: did its training corpus hold GIFT-Eval's test windows?

Read from the model's training_data.json (timemoe-export writes it from the corpus manifest). "No" only when the
corpus was guarded against this very data by content, "Yes" when an audit found test windows in it; otherwise the
answer is "unknown": the command refuses to guess, and its line says how to find out.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.gift_eval import Configuration
from ...model.hf_layout import TRAINING_DATA

UNKNOWN = "unknown"
HOW_TO_FIND_OUT = ("run `timemoe-prep audit CORPUS --benchmark gift-eval:DIR` on the model's corpus, or prepare it "
                   "again with `--exclude-benchmark gift-eval:DIR`, retrain and re-export")


def testdata_leakage(model_dir: str | Path, configs: list[Configuration]) -> tuple[str, str]:
    """("Yes" | "No" | "unknown", why): the value config.json records and the reason the command prints."""
    path = Path(model_dir) / TRAINING_DATA
    if not path.is_file():
        return UNKNOWN, f"{path}: none (a released model, or exported before it existed); {HOW_TO_FIND_OUT}"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return UNKNOWN, f"{path}: unreadable ({e}); {HOW_TO_FIND_OUT}"
    return record_leakage(record, path, configs)


def record_leakage(record: dict, path: Path, configs: list[Configuration]) -> tuple[str, str]:
    """What a readable training_data.json says. The corpus manifest records no GIFT-Eval guard or audit yet (prep's
    --exclude-benchmark gift-eval and `timemoe-prep audit` will write them); until it does, nothing says."""
    return UNKNOWN, f"{path}: records no GIFT-Eval guard or audit of corpus {record.get('corpus')}; {HOW_TO_FIND_OUT}"
