"""``timemoe-prep inspect DIR``: per-domain table (sequences, points, length quantiles) and a PNG of sample series.

Reads the shards through memory maps; only the lengths and the sampled series are materialised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from data_prep.corpus_manifest import MANIFEST_NAME, load_manifest, shard_paths, verify_shards
from data_prep.errors import PrepError
from data_prep.shards import read_shard

QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)
PLOT_POINTS = 512  # the tail of each sampled series that is drawn


def domain_lengths(out_dir: Path) -> dict[str, np.ndarray]:
    """Sequence lengths per domain, over all shards."""
    parts: dict[str, list[np.ndarray]] = {}
    for path in shard_paths(out_dir):
        table = read_shard(path)
        lengths = pc.list_value_length(table.column("target")).to_numpy()
        domains = table.column("domain").to_numpy(zero_copy_only=False)
        for domain in np.unique(domains):
            parts.setdefault(str(domain), []).append(lengths[domains == domain])
    return {d: np.concatenate(p) for d, p in sorted(parts.items())}


def summary_table(out_dir: Path) -> str:
    header = ["domain", "sequences", "points", *(f"len p{int(q * 100)}" for q in QUANTILES)]
    rows = []
    for domain, lengths in domain_lengths(out_dir).items():
        qs = np.quantile(lengths, QUANTILES).round().astype(int)
        rows.append([domain, f"{lengths.size:,}", f"{int(lengths.sum()):,}", *(f"{q:,}" for q in qs)])
    return text_table(header, rows)


def text_table(header: list[str], rows: list[list[str]], labels: int = 1) -> str:
    """Columns under a ruled header, the first ``labels`` left-aligned, the figures right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def plot_samples(out_dir: Path, png: Path, per_domain: int = 3, seed: int = 0) -> Path:
    """A grid, one row per domain, of ``per_domain`` randomly chosen series (their last PLOT_POINTS points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    tables = [read_shard(p) for p in shard_paths(out_dir)]
    where: dict[str, list[tuple[int, int]]] = {}
    for t, table in enumerate(tables):
        for row, domain in enumerate(table.column("domain").to_pylist()):
            where.setdefault(domain, []).append((t, row))
    domains = sorted(where)
    fig, axes = plt.subplots(len(domains), per_domain, figsize=(4 * per_domain, 1.8 * len(domains)), squeeze=False)
    for r, domain in enumerate(domains):
        picks = rng.choice(len(where[domain]), size=min(per_domain, len(where[domain])), replace=False)
        for c in range(per_domain):
            ax = axes[r][c]
            ax.tick_params(labelsize=6)
            if c >= len(picks):
                ax.axis("off")
                continue
            t, row = where[domain][int(picks[c])]
            item = tables[t].slice(row, 1).to_pylist()[0]
            ax.plot(np.asarray(item["target"][-PLOT_POINTS:]), linewidth=0.7)
            ax.set_title(f"{domain}: {item['item_id'][-48:]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="timemoe-prep inspect", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    # Not into DIR by default: shared corpora are often read-only.
    p.add_argument("--plot", "--out", type=Path, dest="plot",
                   help="PNG to write (default: <DIR name>-samples.png in the current directory)")
    p.add_argument("--samples", type=int, default=3, help="series per domain in the plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    args = p.parse_args(argv)
    manifest = load_manifest(args.dir)
    if not manifest["totals"]["sequences"]:
        raise PrepError(args.dir / MANIFEST_NAME, "totals.sequences", 0, "the corpus holds no sequence: nothing to "
                        "inspect (prepare it again: timemoe-prep now refuses input that yields none)")
    if args.verify:
        verify_shards(args.dir, manifest)
        print(f"{len(manifest['shards'])} shards match their sha256")
    print(summary_table(args.dir))
    rules = manifest["cleaning"]["rules"]
    print("cleaning: " + ", ".join(f"{k} {v['count']:,} ({v['points']:,} points)" for k, v in rules.items()))
    for s in manifest["skipped"]:
        print(f"skipped {s['domain']}/{s['dataset']}: {s['file']}: {s['problem']}")
    png = plot_samples(args.dir, args.plot or Path(f"{args.dir.resolve().name}-samples.png"), args.samples, args.seed)
    print(f"sample series: {png}")
    return 0
