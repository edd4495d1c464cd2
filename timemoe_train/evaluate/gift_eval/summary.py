"""summary.md and summary.png from OUT's two tables: MASE and CRPS relative to seasonal naive per configuration and
term, then geometrically averaged per domain, per term and per frequency, and over all (the headline)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display needed

from .results import CRPS, MASE, MODEL_TABLE, NAIVE_TABLE, geometric_mean, headline, read_table, relative

SUMMARY = "summary.md"
PLOT = "summary.png"


def write_summary(out: Path, model_name: str, notes: list[str]) -> None:
    model, naive = read_table(out / MODEL_TABLE), read_table(out / NAIVE_TABLE)
    mase, crps = relative(model, naive, MASE), relative(model, naive, CRPS)
    keys = sorted(mase)
    lines = [f"# GIFT-Eval: {model_name}", "", headline(out), "",
             "Each ratio is the model's score over seasonal naive's on the same windows (below 1: better); groups "
             "average them geometrically, as the leaderboard does.", "",
             "| configuration | MASE | naive MASE | MASE ratio | CRPS | naive CRPS | CRPS ratio |",
             "|---|---|---|---|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {model[k][MASE]:.4f} | {naive[k][MASE]:.4f} | {mase[k]:.3f} | {model[k][CRPS]:.4f} | "
                     f"{naive[k][CRPS]:.4f} | {crps[k]:.3f} |")
    groups = {"domain": lambda k: model[k]["domain"], "term": lambda k: k.rsplit("/", 1)[1],
              "frequency": lambda k: k.rsplit("/", 2)[1]}
    for title, group_of in groups.items():
        members = defaultdict(list)
        for k in keys:
            members[group_of(k)].append(k)
        lines += ["", f"## Per {title}", "", f"| {title} | configurations | MASE ratio | CRPS ratio |", "|---|---|---|---|"]
        for g, ks in sorted(members.items()):
            lines.append(f"| {g} | {len(ks)} | {geometric_mean(mase[k] for k in ks):.3f} | "
                         f"{geometric_mean(crps[k] for k in ks):.3f} |")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    (out / SUMMARY).write_text("\n".join(lines) + "\n")
    plot(keys, mase, crps, out / PLOT, model_name)


def plot(keys: list[str], mase: dict, crps: dict, path: Path, model_name: str) -> None:
    fig = Figure(figsize=(10, 1.2 + 0.28 * max(len(keys), 1)), layout="constrained")
    ax = fig.subplots()
    y = range(len(keys))
    ax.barh([i - 0.2 for i in y], [mase[k] for k in keys], height=0.4, label="MASE", color="C0")
    ax.barh([i + 0.2 for i in y], [crps[k] for k in keys], height=0.4, label="CRPS", color="C1")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(list(y), keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("relative to seasonal naive (below 1: better)")
    ax.set_title(f"GIFT-Eval: {model_name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
