"""Where step records go (rank 0 only): `metrics.jsonl` in the run directory, Weights & Biases (offline unless
configured), a progress bar, and heatmap images. Nothing secret is written: configs pass through `scrub`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tqdm import tqdm

_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)


def scrub(obj):
    """A copy of a config container with the values of secret-looking keys replaced by '***'."""
    if isinstance(obj, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) else scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; the `skipped` field says what happened
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class Monitor:
    def __init__(self, run_dir: Path, cfg, enabled: bool, config: dict, total_steps: int, start_step: int,
                 wandb_id: str | None = None):
        self.cfg, self.enabled, self.run_dir = cfg, enabled, Path(run_dir)
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not cfg.progress)
        if cfg.wandb.mode != "disabled":
            import wandb

            w = cfg.wandb
            self.wandb = wandb.init(mode=w.mode, project=w.project, entity=w.entity, name=w.name, group=w.group,
                                    tags=list(w.tags), dir=str(self.run_dir), config=scrub(config), id=wandb_id,
                                    resume="allow")
            self.wandb_id = self.wandb.id

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_safe(v) for k, v in record.items()}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if not isinstance(v, list) and v is not None},
                           step=record["step"])
        self.bar.update(record["step"] - self.bar.n)
        parts = [f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss nan",
                 f"aux {record['aux_loss']:.3f}" if record.get("aux_loss") is not None else None,
                 f"lr {record['lr']:.2e}",
                 f"gnorm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else None,
                 f"{record['tokens_per_s']:.0f} pts/s",
                 f"mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else None]
        self.bar.set_postfix_str(" | ".join(p for p in parts if p), refresh=False)

    def log_images(self, step: int, figures: dict) -> None:
        """Save each matplotlib figure as PNG under the run directory and send it to W&B."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        folder = self.run_dir / "expert_load"
        folder.mkdir(exist_ok=True)
        images = {}
        for name, fig in figures.items():
            path = folder / f"step{step:08d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            if self.wandb is not None:
                import wandb

                images[f"expert_load_by_domain/{name}"] = wandb.Image(str(path))
        if images:
            self.wandb.log(images, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
