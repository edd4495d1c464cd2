"""Was a benchmark CSV kept out of a model's training corpus? Read from the model's `training_data.json` (written by
`timemoe-export`, see export/training_data.py), one status per (model, CSV) pair:

    guarded       the CSV's sha256 is among the benchmarks the corpus's leakage guard hashed: its content was excluded
    by name only  its stem matches the guard's name rule (the ETT family), but this file's content was not hashed
    not guarded   the record names neither: series copied from the CSV may have been trained on
    unknown       no readable record (a released model, one exported before the record existed, a model object)
    held out      fine-tuned (timemoe-finetune) on this very file's rows before its test split only, from a base
                  model whose own status on it is guarded or held out
    not held out  fine-tuned on this file's rows that the evaluated test split includes

Evaluation goes on whatever the status; the report carries it and the CLI warns.

GIFT-Eval asks each submission one question, `testdata_leakage` ("Yes"/"No"), answered per model by
`gift_eval_leakage` from the same record: the digests of the GIFT-Eval configurations its corpus was guarded
against (`timemoe-prep --exclude-benchmark gift-eval:DIR`) or audited for (`timemoe-prep audit`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

from data_prep.gift_leakage import config_digests, read_audit

from ..checkpoint.digests import file_digest
from ..model.hf_layout import TRAINING_DATA

WARN = ("not guarded", "by name only", "not held out")


def read_record(model) -> tuple[dict | None, Path | None, str]:
    """(record, its path, "") of a model directory's training_data.json, or (None, path, why there is none)."""
    if not isinstance(model, (str, Path)):
        return None, None, "a model object: no training_data.json to read"
    path = Path(model) / TRAINING_DATA
    if not path.is_file():
        return None, path, f"{path}: none (a released model, or exported before it existed)"
    try:
        return json.loads(path.read_text()), path, ""
    except (OSError, ValueError) as e:
        return None, path, f"{path}: unreadable ({e})"


def leakage_status(model, csv: Path, digest: Callable[[], str], test_start: int | None = None,
                   rows: int | None = None) -> dict[str, str]:
    """{"status", "detail"} of one model (a directory or a loaded model) on one CSV; `digest()` gives the CSV's
    sha256, called only when the model's record has a guard to compare it with; `test_start`: the first row of
    the evaluated test split (a fine-tuned model must not have read it) of the CSV's `rows` rows."""
    record, path, why = read_record(model)
    if record is None:
        return {"status": "unknown", "detail": why}
    return record_status(record, path, csv, digest, test_start, rows)


def record_status(record: dict, path: Path, csv: Path, digest: Callable[[], str], test_start: int | None,
                  rows: int | None) -> dict[str, str]:
    if "split" in record:
        return fine_tuned_status(record, path, csv, digest, test_start, rows)
    if record.get("synthetic"):
        return {"status": "synthetic only", "detail": f"{path}: {record['note']}"}
    guard, corpus = record.get("leakage_guard"), record.get("corpus")
    if guard is None:
        if record.get("manifest_sha256") is None:  # the corpus could not be read at export
            return {"status": "unknown", "detail": f"{path}: {record.get('note')}"}
        return {"status": "not guarded", "detail": f"corpus {corpus} was prepared without a leakage guard"}
    sha = digest()
    hashed = {b.get("sha256"): b.get("file") for b in guard.get("benchmarks", [])}
    if sha in hashed:
        return {"status": "guarded", "detail": f"its content ({hashed[sha]}, sha256 {sha[:12]}) was excluded from "
                                               f"corpus {corpus}"}
    pattern = guard.get("name_pattern")
    if pattern and re.search(pattern, Path(csv).stem.replace("_", " ")):
        return {"status": "by name only", "detail": f"corpus {corpus} left out series named like "
                                                    f"{Path(csv).stem}, but never hashed this file's content"}
    if not pattern and not hashed:
        return {"status": "not guarded", "detail": f"corpus {corpus} was prepared with the leakage guard off"}
    return {"status": "not guarded", "detail": f"corpus {corpus} was guarded against other benchmarks only"}


def leakage_report(items, csv: Path, test_start: int | None = None,
                   rows: int | None = None) -> dict[str, dict[str, str]]:
    """Label -> status, for `model_items`' (label, model) pairs; the CSV is hashed once at most, however many
    models there are."""
    digest = functools.cache(lambda: file_digest(Path(csv))[1])
    return {label: leakage_status(model, csv, digest, test_start, rows) for label, model in items}


def leakage_lines(results: dict) -> list[str]:
    """One line per (model, dataset) pair of `evaluate_many`'s results."""
    return [f"`{label}` on {d['dataset']}: {s['status']}: {s['detail']}"
            for d in results["datasets"] for label, s in d["leakage"].items()]


def leakage_warnings(results: dict) -> list[str]:
    return [f"WARNING: `{label}` on {d['dataset']} is {s['status']}: its scores may be inflated by training on "
            f"the test data; re-run timemoe-prep with --benchmarks {d['csv']}, then retrain and re-export"
            for d in results["datasets"] for label, s in d["leakage"].items() if s["status"] in WARN]


def fine_tuned_status(record: dict, path: Path, csv: Path, digest: Callable[[], str], test_start: int | None,
                      rows: int | None) -> dict[str, str]:
    """A timemoe-finetune output: its own split of its fine-tuning file (the series of `rows` points, or all of
    them when none has that length), then its base model's record."""
    split = record["split"]
    base_record = record.get("fine_tuned_from", {}).get("training_data")
    base = ({"status": "unknown", "detail": "the base model has no training_data.json"} if base_record is None
            else record_status(base_record, path, csv, digest, test_start, rows))
    if split.get("sha256") != digest():
        if base["status"] == "unknown":
            return base
        return {"status": "not guarded", "detail": f"fine-tuned on {split.get('file')} without a leakage guard; "
                                                   f"the base model: {base['detail']}"}
    groups = [g for g in split["series"] if g["length"] == rows] or split["series"]
    read_until = max(g["val"][1] for g in groups)
    if test_start is None or test_start < read_until:
        return {"status": "not held out", "detail": f"fine-tuned on rows [0, {read_until}) of this file, which the "
                                                    f"evaluated test split (from row {test_start}) overlaps"}
    own = (f"fine-tuned on this file's rows before {read_until} only (train and val of --split "
           f"{split['split']}); the test split from row {test_start} was never read by training")
    if base["status"] in ("guarded", "held out", "synthetic only"):
        return {"status": "held out", "detail": f"{own}; the base model: {base['detail']}"}
    return {"status": base["status"], "detail": f"{own}; but the base model: {base['detail']}"}


def gift_eval_leakage(model, data: Path, configs: list[str] | None = None) -> dict:
    """GIFT-Eval's `testdata_leakage` for `model` (a directory, or a loaded model) scored on the configurations
    `configs` (names, default all) under `data`: {"testdata_leakage": "Yes" | "No" | None, "line": one line saying
    which and why, "configs": {name: "held" | "guarded" | "audited" | "unknown" | "synthetic"}}.

    Each scored configuration is matched by its digest (``data_prep.gift_leakage``: its test windows' content) with
    the model's training_data.json: "held" when an audit of its corpus (``timemoe-prep audit``, read at export or
    now from the corpus) found windows of it, "guarded" when the corpus was prepared with ``--exclude-benchmark``
    over it, "audited" when an audit found none. "Yes" when one is held; "No" only when every one is guarded or
    audited, or when the model trained on synthetic series only; otherwise None: this refuses to guess, and the line says how to find out. A fine-tuned model is "Yes"
    when its base model is, else undeclared: its fine-tuning file was never checked against GIFT-Eval.
    """
    how = (f"find out with `timemoe-prep audit CORPUS --benchmark gift-eval:{data}` (CORPUS: the corpus the model "
           "was trained on) and run this again, or prepare the corpus with `--exclude-benchmark gift-eval:"
           f"{data}` and train again")
    record, _, why = read_record(model)
    if record is None:
        return {"testdata_leakage": None, "configs": {}, "line": f"testdata_leakage: not declared: {why}; {how}"}
    return _gift_eval_decision(record, Path(data), configs, how)


def _gift_eval_decision(record: dict, data: Path, configs: list[str] | None, how: str) -> dict:
    if "split" in record:
        base = record.get("fine_tuned_from", {}).get("training_data")
        decided = _gift_eval_decision(base, data, configs, how) if base else None
        if decided is not None and decided["testdata_leakage"] == "Yes":
            return {**decided, "line": decided["line"].replace("Yes: ", "Yes: its base model's training data: ", 1)}
        why = f"fine-tuned on {record['split'].get('file')}, which nothing checked against GIFT-Eval"
        return {"testdata_leakage": None, "configs": {}, "line": f"testdata_leakage: not declared: {why}; {how}"}
    digests = config_digests(data, configs)
    if record.get("synthetic"):
        return {"testdata_leakage": "No", "configs": dict.fromkeys(digests, "synthetic"),
                "line": f"testdata_leakage: No: {record['note']}"}
    corpus = record.get("corpus")
    audits = {**record.get("leakage_audit", {}), **(read_audit(corpus, record.get("manifest_sha256"))
                                                     if corpus else {})}
    guarded = {c["sha256"] for g in (record.get("leakage_guard") or {}).get("gift_eval", [])
               for c in g["configs"].values()}
    status = {}
    for name, digest in digests.items():
        if audits.get(digest, {}).get("found"):
            status[name] = "held"
        elif digest in guarded:
            status[name] = "guarded"
        else:
            status[name] = "audited" if digest in audits else "unknown"
    count = lambda word: [name for name, s in status.items() if s == word]  # noqa: E731
    held, unknown = count("held"), count("unknown")
    if held:
        found = ", ".join(f"{name} {audits[digests[name]]['found']} of {audits[digests[name]]['windows']}"
                          for name in held)
        return {"testdata_leakage": "Yes", "configs": status,
                "line": f"testdata_leakage: Yes: the audit of corpus {corpus} found test windows of {len(held)} of "
                        f"the {len(status)} scored configurations in it ({found})"}
    if not unknown:
        parts = [f"{len(names)} prepared with --exclude-benchmark over this very data" if word == "guarded" else
                 f"{len(names)} audited and none of their windows found" for word in ("guarded", "audited")
                 if (names := count(word))]
        return {"testdata_leakage": "No", "configs": status,
                "line": f"testdata_leakage: No: corpus {corpus} holds no test window of the {len(status)} scored "
                        f"configurations ({'; '.join(parts)}; matched by the content of their test windows)"}
    shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    return {"testdata_leakage": None, "configs": status,
            "line": f"testdata_leakage: not declared: corpus {corpus} was neither guarded against nor audited for "
                    f"{len(unknown)} of the {len(status)} scored configurations ({shown}); {how}"}
