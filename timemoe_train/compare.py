"""`python -m timemoe_train.compare RUNS_DIR --csv ETTh1.csv`: the report of `experiment=moe_vs_dense`.

RUNS_DIR is the sweep directory (hydra.sweep.dir): one sub-directory per job (Hydra's `.hydra/config.yaml` says its
`arm` and seed, `checkpoints/` holds its final checkpoint). Other runs and unfinished jobs there are left out with a
note; jobs that differ in anything trained but their arm and seed are refused. Each job is exported to the HF
layout, then scored

- zero-shot on each CSV (the long-horizon protocol of `timemoe-eval`, horizon 96, context `--csv-context`), and
- on the held-out tails of its own corpus: the last `data.holdout_points` points of every sequence, which its
  training never saw, forecast from the `--context` points before them; errors in units of each window's std,
  averaged per domain, then over domains so that no domain outweighs the others.

Writes report.md (mean ± std over seeds per arm, with activated and total parameter counts, moe − dense per figure
and the MoE layers' expert load), report.json (every job's figures and loss curve) and report.png (the training loss
curves and every figure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from tqdm import tqdm

from .data.errors import DataError
from .data.corpus import read_manifest
from .data.shards import ShardStore
from .export.cli import export
from .model import TimeMoeForPrediction
from .evaluate.baselines import last_value
from .evaluate.data import EvalError
from .evaluate.long_horizon import evaluate_long_horizon

METRICS = ("mse", "mae")


# Keys in which the jobs of one study differ: its arm and seed (model.use_dense and model.intermediate_size follow
# the arm through interpolations, which the saved configs keep unresolved), and the keys that change nothing trained
# (configs/train.yaml's list, the same one that keeps them out of run names) but trainer.max_steps: a run may be
# extended, yet arms trained for different numbers of steps are not a comparison.
_TRAIN_YAML = Path(__file__).resolve().parents[1] / "configs" / "train.yaml"
_STUDY_KEYS = ("arm", "trainer.seed")


def untrained_keys() -> list[str]:
    keys = OmegaConf.load(_TRAIN_YAML).hydra.job.config.override_dirname.exclude_keys
    return [k for k in keys if k != "trainer.max_steps"]


def flat(cfg, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a config (interpolations as written)."""
    out = {}
    for key in cfg:
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node) and not OmegaConf.is_interpolation(cfg, key):
            out |= flat(node, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = OmegaConf.to_container(node) if OmegaConf.is_list(node) else node._value()
    return out


def _varies(key: str, free: list[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in (*_STUDY_KEYS, *free))


def find_jobs(runs_dir: Path) -> tuple[list[dict], list[str]]:
    """The finished jobs of experiment=moe_vs_dense in runs_dir, and a note for each directory left out (another
    experiment's run, an unfinished job). Refuses jobs that differ in anything trained but their arm and seed."""
    jobs, notes, free = [], [], untrained_keys()
    for cfg_path in sorted(runs_dir.glob("*/.hydra/config.yaml")):
        job_dir = cfg_path.parents[1]
        cfg = OmegaConf.load(cfg_path)
        if "arm" not in cfg or "arms" not in cfg:
            notes.append(f"{job_dir}: skipped, not a job of experiment=moe_vs_dense (no `arm` in .hydra/config.yaml)")
            continue
        if not (job_dir / "checkpoints" / "latest").exists():
            notes.append(f"{job_dir}: skipped, no finished checkpoint (checkpoints/latest): still running or stopped")
            continue
        hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
        # A relative data.path is relative to where the job was launched, which Hydra records.
        cwd = Path(OmegaConf.load(hydra_yaml).hydra.runtime.cwd) if hydra_yaml.exists() else Path.cwd()
        data = str(cwd / cfg.data.path)
        jobs.append({"dir": job_dir, "arm": str(cfg.arm), "seed": int(cfg.trainer.seed), "data": data,
                     "holdout": int(cfg.data.holdout_points),
                     "config": {k: v for k, v in flat(cfg).items() if not _varies(k, free)} | {"data.path": data}})
    if not jobs:
        raise EvalError(f"{runs_dir}: no finished job of experiment=moe_vs_dense (*/.hydra/config.yaml with "
                        f"checkpoints/latest); pass the sweep's directory (hydra.sweep.dir)"
                        + "".join(f"\n  {n}" for n in notes))
    first = jobs[0]
    for job in jobs[1:]:
        for key in sorted(first["config"].keys() | job["config"].keys()):
            a, b = first["config"].get(key, "<unset>"), job["config"].get(key, "<unset>")
            if a != b:
                raise EvalError(f"{job['dir']}: {key} = {b!r}, but {first['dir']} has {a!r}: jobs of different "
                                f"studies cannot be compared (pass one sweep's directory)")
    for job in jobs:
        del job["config"]
    return jobs, notes


def held_out_windows(data: str, holdout: int, context: int):
    """Contexts [N, context] and truths [N, holdout] of every sequence long enough, with each one's domain.

    Each window is z-scored by its own mean/std, held-out points included: forecasts are affine-equivariant
    (`forecast()` rescales its context), so this only sets the unit of the errors, and one that a flat context
    cannot blow up (the prescriptions of a new drug: years of zeros, then sales)."""
    store = ShardStore.scan(read_manifest(data))
    chosen = np.flatnonzero(store.length_S >= context + holdout)
    if holdout < 1 or not len(chosen):
        raise EvalError(f"{data}: no sequence holds context {context} + held-out {holdout} points "
                        f"(data.holdout_points must be > 0)")
    windows = np.stack([store.sequence(int(s))[-(context + holdout):] for s in chosen]).astype(np.float64)
    std = windows.std(axis=1, keepdims=True)
    keep = std[:, 0] > 0
    z = (windows[keep] - windows[keep].mean(axis=1, keepdims=True)) / std[keep]
    domains = np.asarray(store.domain_names)[store.domain_S[chosen[keep]]]
    return torch.from_numpy(z[:, :context]).float(), torch.from_numpy(z[:, context:]), domains


def held_out_scores(model, context_NT, truth_NH, domains, batch_size: int = 256) -> dict:
    horizon = truth_NH.shape[1]
    forecasts = [model.forecast(context_NT[b:b + batch_size], horizon).double()
                 for b in range(0, len(context_NT), batch_size)]
    err_NH = torch.cat(forecasts) - truth_NH
    per_domain = {d: {"mse": float(err_NH[domains == d].pow(2).mean()), "mae": float(err_NH[domains == d].abs().mean())}
                  for d in sorted(set(domains))}
    return {m: float(np.mean([v[m] for v in per_domain.values()])) for m in METRICS} | {"per_domain": per_domain,
                                                                                      "series": len(truth_NH)}


class LastValue:
    """The last-value baseline behind the model's interface, for the held-out windows."""

    def forecast(self, context_BT: torch.Tensor, horizon: int) -> torch.Tensor:
        return last_value(context_BT, horizon)


def training_log(job_dir: Path, last: int = 50) -> dict:
    """From the job's metrics.jsonl: the forecasting loss of every step (mean over the horizon heads, without the
    MoE's balance term); its median over the last `last` steps, as one batch can hold a window whose loss is 10⁵
    times the rest (a flat context before a jump: both arms meet it at the same step); and each MoE layer's share
    of routed points per expert over those steps (a collapsed router sends most points to a few experts)."""
    path = job_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    curve = [float(np.mean([v for k, v in m.items() if k.startswith("head_loss/")])) for m in steps
             if any(k.startswith("head_loss/") for k in m)]
    load = {}
    for key in sorted({k for m in steps for k in m if k.startswith("expert_load/")},
                      key=lambda k: int(k.removeprefix("expert_load/layer"))):
        shares = [m[key] for m in steps[-last:] if m.get(key) and sum(m[key]) > 0]  # a dense layer routes nothing
        if shares:
            load[key.removeprefix("expert_load/")] = np.mean(shares, 0).tolist()
    return {"loss_curve": curve, "train_loss": float(np.median(curve[-last:])) if curve else None,
            "expert_load": load}


SCORES = "compare.json"  # a job's scores under one protocol, beside its checkpoints


def score_job(job: dict, held: tuple, csvs: list[str], protocol: dict) -> dict:
    """The job's parameter counts and scores; read back from SCORES when its final checkpoint and the protocol are
    those it was scored under, so that a report over more seeds (or re-run after a stop) scores only what is new."""
    key = protocol | {"checkpoint": (job["dir"] / "checkpoints" / "latest").read_text().strip(),
                      "csvs": [str(Path(c).resolve()) for c in csvs]}
    cache = job["dir"] / SCORES
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is not None and cached["key"] == key:
        return cached["scores"]
    hf = export(job["dir"] / "checkpoints", job["dir"] / "hf")
    model = TimeMoeForPrediction.from_pretrained(hf).eval()
    scores = {"activated_params": model.config.active_params_per_token,
              "total_params": sum(p.numel() for p in model.parameters()), "zero_shot": {}, "baselines": {}}
    with torch.no_grad():
        scores["held_out"] = held_out_scores(model, *held)
        for csv in csvs:
            r = evaluate_long_horizon({"model": model}, csv, horizons=(96,), context_lengths=(protocol["csv_context"],),
                                      max_windows=protocol["max_windows"], progress=False)
            scores["zero_shot"][r["dataset"]] = r["rows"][0]["metrics"]["model"]
            scores["baselines"][r["dataset"]] = {k: r["rows"][0]["metrics"][k] for k in ("seasonal_naive", "last_value")}
    cache.write_text(json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
    return scores


def score_jobs(jobs: list[dict], csvs: list[str], max_windows: int, context: int, csv_context: int,
               progress: bool) -> list[dict]:
    held = held_out_windows(jobs[0]["data"], jobs[0]["holdout"], context)
    held_last_value = held_out_scores(LastValue(), *held)
    protocol = {"horizon": 96, "csv_context": csv_context, "max_windows": max_windows, "held_out_context": context}
    for job in tqdm(jobs, desc="jobs", unit="job", disable=not progress):
        job |= score_job(job, held, csvs, protocol) | training_log(job["dir"])
        job |= {"protocol": protocol, "held_out_last_value": held_last_value, "dir": str(job["dir"])}
    return jobs


def columns(jobs: list[dict]) -> list[tuple[str, callable]]:
    """(header, job -> value) of every compared figure."""
    out = [("train forecast loss (median of the last 50 steps)", lambda j: j["train_loss"])]
    for name in jobs[0]["zero_shot"]:
        out += [(f"{name} h96 {m.upper()}", lambda j, n=name, m=m: j["zero_shot"][n][m]) for m in METRICS]
    out += [(f"held-out {m.upper()}", lambda j, m=m: j["held_out"][m]) for m in METRICS]
    return out


def summarise(jobs: list[dict]) -> dict:
    arms = {}
    for arm in dict.fromkeys(j["arm"] for j in jobs):
        mine = [j for j in jobs if j["arm"] == arm]
        arms[arm] = {"seeds": sorted(j["seed"] for j in mine), "activated_params": mine[0]["activated_params"],
                     "total_params": mine[0]["total_params"],
                     # one seed has no spread: None, not a zero that every gap would "exceed"
                     "figures": {h: (float(np.mean([f(j) for j in mine])), float(np.std([f(j) for j in mine], ddof=1))
                                     if len(mine) > 1 else None) for h, f in columns(jobs)}}
    return arms


def moe_minus_dense(arms: dict) -> dict[str, tuple[float, bool]]:
    """Per figure: moe's mean less dense's, and whether that gap exceeds one std (the larger of the two arms')."""
    if not {"moe", "dense"} <= arms.keys():
        return {}
    out = {}
    for head, (moe, moe_std) in arms["moe"]["figures"].items():
        dense, dense_std = arms["dense"]["figures"][head]
        spread = None if moe_std is None or dense_std is None else max(moe_std, dense_std)
        out[head] = (moe - dense, spread is not None and abs(moe - dense) > spread)
    return out


def markdown(jobs: list[dict], arms: dict, command: str, notes: list[str] = ()) -> str:
    heads = [h for h, _ in columns(jobs)]
    lines = ["# MoE vs dense at equal activated parameters", "",
             f"`{command}`; mean ± sample std over seeds. Lower is better everywhere.", "",
             "| arm | seeds | activated params / point | total params | " + " | ".join(heads) + " |",
             "|---|---|---|---|" + "---|" * len(heads)]
    for arm, a in arms.items():
        cells = [f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} (one seed)"
                 for mean, std in (a["figures"][h] for h in heads)]
        lines.append(f"| {arm} | {','.join(map(str, a['seeds']))} | {a['activated_params']:,} | "
                     f"{a['total_params']:,} | " + " | ".join(cells) + " |")
    gaps = moe_minus_dense(arms)
    if gaps:
        lines.append("| moe − dense | | | | " + " | ".join(
            f"{gaps[h][0]:+.4f}{' (> 1 std)' if gaps[h][1] else ''}" for h in heads) + " |")
    j = jobs[0]
    if "protocol" in j:
        p = j["protocol"]
        lines += ["", f"Zero-shot: horizon {p['horizon']}, context {p['csv_context']}, {p['max_windows']} evenly "
                      f"spread test windows per channel; held-out context {p['held_out_context']}."]
    for name, b in j["baselines"].items():
        lines += ["", f"{name} baselines on the same windows: seasonal naive MSE {b['seasonal_naive']['mse']:.4f} / "
                      f"MAE {b['seasonal_naive']['mae']:.4f}, last value MSE {b['last_value']['mse']:.4f} / "
                      f"MAE {b['last_value']['mae']:.4f}."]
    if "held_out_last_value" in j:
        b = j["held_out_last_value"]
        lines += ["", f"Held-out last-value baseline: MSE {b['mse']:.4f} / MAE {b['mae']:.4f}."]
    lines += ["", f"Held-out: the last {j['holdout']} points of each of {j['held_out']['series']} corpus sequences "
                  f"(never trained on: data.holdout_points), in units of each window's std; mean over domains "
                  f"({', '.join(j['held_out']['per_domain'])})."]
    routed = [x for x in jobs if x.get("expert_load")]
    if routed:
        lines += ["", "Expert load over the last 50 steps, per layer: the largest expert's share × the number of "
                      "experts (1: balanced; E: every point to one expert), and experts with under 1/(10·E) of the "
                      "points:"]
        for x in routed:
            lines.append(f"- {x['arm']} seed {x['seed']}: " + "; ".join(
                f"{layer} {max(v) * len(v):.2f} ({sum(f < 0.1 / len(v) for f in v)} idle)"
                for layer, v in x["expert_load"].items()))
    if notes:
        lines += ["", "Left out:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(jobs: list[dict], arms: dict, path: Path, smooth: int = 25) -> None:
    """The training loss curves of every job (moving median over `smooth` steps: see training_log), then one panel
    per figure: each arm's mean ± std and its seeds."""
    heads = columns(jobs)
    fig = Figure(figsize=(3 * len(heads) + 5, 3.2), layout="constrained")
    curves, *panels = fig.subplots(1, len(heads) + 1, squeeze=False, width_ratios=[5 / 3] + [1] * len(heads))[0]
    for i, arm in enumerate(arms):
        for j in (j for j in jobs if j["arm"] == arm and j.get("loss_curve")):
            w = min(smooth, len(j["loss_curve"]))
            loss = np.median(np.lib.stride_tricks.sliding_window_view(j["loss_curve"], w), axis=1)
            curves.plot(np.arange(len(loss)) + w, loss, color=f"C{i}", lw=0.8,
                        label=f"{arm} seed {j['seed']}")
    curves.set(xlabel="step", title=f"train forecast loss ({smooth}-step median)")
    curves.legend(fontsize=7)
    for ax, (head, f) in zip(panels, heads):
        for i, arm in enumerate(arms):
            mean, std = arms[arm]["figures"][head]
            ax.bar(i, mean, yerr=std or 0.0, color=f"C{i}", alpha=0.6, capsize=4)
            ax.scatter([i] * sum(j["arm"] == arm for j in jobs), [f(j) for j in jobs if j["arm"] == arm],
                       color="black", s=10, zorder=3)
        values = [f(j) for j in jobs]
        pad = (max(values) - min(values)) or abs(max(values)) * 0.1 or 1.0
        ax.set_ylim(min(values) - pad, max(values) + pad)
        ax.set_xticks(range(len(arms)), list(arms))
        ax.set_title(head, fontsize=9)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timemoe_train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path, help="the multirun directory of experiment=moe_vs_dense")
    p.add_argument("--csv", nargs="*", default=[], help="zero-shot benchmark CSVs (e.g. examples/data/ETTh1.csv)")
    p.add_argument("--max-windows", type=int, default=100, help="evenly spread test windows per channel")
    p.add_argument("--context", type=int, default=256, help="context of the held-out forecasts")
    p.add_argument("--csv-context", type=int, default=512, help="context of the zero-shot CSV forecasts (horizon 96)")
    p.add_argument("--out", type=Path, default=None, help="report directory (default RUNS_DIR/report)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = args.out or args.runs_dir / "report"
    try:
        jobs, notes = find_jobs(args.runs_dir)
        for note in notes:
            print(f"compare: {note}", file=sys.stderr)
        jobs = score_jobs(jobs, args.csv, args.max_windows, args.context, args.csv_context, not args.no_progress)
    except (EvalError, DataError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    arms = summarise(jobs)
    for arm, a in arms.items():
        print(f"{arm}: {a['activated_params']:,} activated weights per point, {a['total_params']:,} in all "
              f"(seeds {', '.join(map(str, a['seeds']))})")
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m timemoe_train.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "report.md").write_text(markdown(jobs, arms, command, notes))
    (out / "report.json").write_text(json.dumps({"arms": arms, "jobs": jobs}, indent=2) + "\n")
    plot(jobs, arms, out / "report.png")
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
