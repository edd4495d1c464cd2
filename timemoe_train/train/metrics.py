"""What a step measured: losses, points, FLOPs and expert load, summed over micro-batches and reduced over ranks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..model import TimeMoeConfig
from ..model.attention import segment_starts

# Dense bf16 peak FLOP/s of one device, for the MFU estimate when trainer.peak_flops_per_device is not set.
KNOWN_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def segment_square_sum(sequence_ids_BT: torch.Tensor) -> torch.Tensor:
    """Σ over packed sequences (runs of one id, padding left out) of length²: attention work is quadratic per
    sequence, not per row. A scatter-add into one slot per possible run: no size is read back to the host."""
    B, T = sequence_ids_BT.shape
    run_BT = torch.cumsum(segment_starts(sequence_ids_BT), dim=1) - 1 + T * torch.arange(
        B, device=sequence_ids_BT.device).unsqueeze(1)
    valid_BT = (sequence_ids_BT >= 0).double()
    lengths = valid_BT.new_zeros(B * T).scatter_add_(0, run_BT.flatten(), valid_BT.flatten())
    return lengths.pow(2).sum()


def train_flops(c: TimeMoeConfig, points: float, square_sum: float) -> float:
    """Forward + backward FLOPs: 6 per active weight per point, plus 12·L·D·Σ len² for QKᵀ and AV (counted over
    the whole sequence, as PaLM's MFU does)."""
    return 6.0 * c.active_params_per_token * points + 12.0 * c.num_hidden_layers * c.hidden_size * square_sum


def expert_choices(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, N, K] indices of the experts each token goes to (softmax then top-k, as the router does)."""
    return torch.stack([torch.topk(logits_NE.detach().float(), top_k, dim=-1).indices for logits_NE in router_logits])


_FLAGS = 3  # leading entries of the reduced vector: non-finite, stop request, failed save


class StepStats:
    """Sums of one optimizer step on this rank, kept on the device: adding a micro-batch reads nothing back to the
    host (no `.item()`, boolean masks or `bincount`, which would make the host wait for the device). `reduce()`
    makes them global in one all-reduce and reads only the two flags every rank must act on."""

    def __init__(self, config: TimeMoeConfig, num_domains: int, device):
        L, E = config.num_hidden_layers, config.num_experts
        self.config, self.num_domains, self.device = config, num_domains, device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.aux = torch.zeros((), dtype=torch.float64, device=device)
        self.heads = torch.zeros(len(config.horizon_lengths), dtype=torch.float64, device=device)
        self.micro = torch.zeros((), dtype=torch.float64, device=device)
        self.points = torch.zeros((), dtype=torch.float64, device=device)
        self.square_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        self.load_LE = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.domain_load_DLE = torch.zeros(max(num_domains, 1), L, E, dtype=torch.float64, device=device)

    def add(self, out, batch: dict) -> None:
        self.micro += 1
        self.loss += out.loss.detach().double()
        if out.aux_loss is not None:
            self.aux += out.aux_loss.detach().double()
        self.heads += out.head_losses.detach().double()
        self.nonfinite += (~torch.isfinite(out.loss.detach())).double()
        seq_BT = batch["sequence_ids"]
        self.points += (seq_BT >= 0).sum()
        self.square_sum += segment_square_sum(seq_BT)
        if out.router_logits and out.router_logits[0] is not None:
            self._count_experts(out.router_logits, batch)

    def _count_experts(self, router_logits, batch) -> None:
        """Padding points count with weight 0 instead of being masked out (a mask's size is a host read)."""
        L, E, K = self.config.num_hidden_layers, self.config.num_experts, self.config.num_experts_per_tok
        experts_LNK = expert_choices(router_logits, K)
        N = experts_LNK.shape[1]
        valid_NK = (batch["sequence_ids"] >= 0).flatten().double()[:, None].expand(N, K)
        self.load_LE.scatter_add_(1, experts_LNK.reshape(L, N * K), valid_NK.reshape(1, N * K).expand(L, N * K))
        if self.num_domains:
            domain_N = batch["domain_ids"].flatten().clamp(0, self.num_domains - 1)
            layer_L = torch.arange(L, device=experts_LNK.device)
            flat_LNK = domain_N[None, :, None] * (L * E) + layer_L[:, None, None] * E + experts_LNK
            self.domain_load_DLE.view(-1).scatter_add_(0, flat_LNK.flatten(), valid_NK.expand(L, N, K).flatten())

    def reduce(self, nonfinite_grads: torch.Tensor, stop_requested: bool, save_failed: bool = False
               ) -> "ReducedStats":
        """All-reduce the step's sums over every rank (each rank routes its own tokens), together with the guard's,
        the signal handler's and the background save's flags, so that every rank takes the same decisions: those
        flags are the one host read. The rest stays on the device until `ReducedStats.read()` (logging steps); the
        per-domain counts stay local until `reduce_domain_load`."""
        flags = torch.cat([(self.nonfinite + nonfinite_grads.double()).reshape(1),
                           torch.tensor([float(stop_requested), float(save_failed)], dtype=torch.float64,
                                        device=self.device)])
        parts = [flags, self.loss, self.aux, self.micro, self.points, self.square_sum, self.heads,
                 self.load_LE.flatten()]
        flat = torch.cat([p.reshape(-1) for p in parts])
        if dist.is_initialized():
            dist.all_reduce(flat)
        nonfinite, stop, save_failed = flat[:_FLAGS].tolist()
        return ReducedStats(nonfinite > 0, stop > 0, save_failed > 0, flat, len(self.config.horizon_lengths),
                            self.load_LE.shape)


@dataclass
class ReducedStats:
    """One step's global sums: the flags on the host, the rest on the device until `read()`."""

    nonfinite: bool
    stop: bool
    save_failed: bool  # some rank's background save failed: every rank stops in this step
    flat: torch.Tensor
    num_heads: int
    load_shape: torch.Size

    def read(self) -> dict:
        values = self.flat[_FLAGS:].cpu()
        loss, aux, micro, points, square_sum = values[:5].tolist()
        heads = values[5:5 + self.num_heads] / micro
        return {"loss": loss / micro, "aux_loss": aux / micro, "points": points, "square_sum": square_sum,
                "head_losses": heads.tolist(), "load_LE": values[5 + self.num_heads:].view(self.load_shape)}


def reduce_domain_load(domain_load_DLE: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(domain_load_DLE)
    return domain_load_DLE.cpu()


# An expert counts as idle below this fraction of the uniform share 1/E (a collapsed router sends it ~nothing).
IDLE_FRACTION = 0.1


def expert_load_metrics(load_LE: torch.Tensor) -> dict:
    """Per layer: each expert's share of the routed token copies; the imbalance max load / mean load (1 when
    balanced, E when one expert takes everything, finite also when experts are idle); the number of experts below
    IDLE_FRACTION of the uniform share."""
    record = {}
    E = load_LE.shape[-1]
    frac_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
    for layer, frac_E in enumerate(frac_LE):
        record[f"expert_load/layer{layer}"] = [round(v, 5) for v in frac_E.tolist()]
        routed = bool(frac_E.sum() > 0)
        record[f"expert_imbalance/layer{layer}"] = float(frac_E.max() * E) if routed else None
        record[f"experts_idle/layer{layer}"] = int((frac_E < IDLE_FRACTION / E).sum()) if routed else None
    return record


def domain_heatmaps(load_DLE: torch.Tensor, domain_names: list[str], title: str):
    """One figure: a layers × experts panel per domain, side by side on one colour scale, each cell labelled
    with its share of that layer's routed tokens (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac_DLE = (load_DLE / load_DLE.sum(-1, keepdim=True).clamp_min(1)).numpy()
    D, L, E = frac_DLE.shape
    fig, axes = plt.subplots(1, D, figsize=(1.5 + D * (0.8 + 0.5 * E), 1.6 + 0.45 * L), squeeze=False,
                             sharey=True, constrained_layout=True)
    vmax = max(float(frac_DLE.max()), 1e-9)
    for ax, frac_LE, name in zip(axes[0], frac_DLE, domain_names):
        im = ax.imshow(frac_LE, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        for (layer, expert), value in np.ndenumerate(frac_LE):
            ax.text(expert, layer, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 * vmax else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, label="share of the layer's tokens")
    fig.suptitle(title, fontsize=10)
    return fig


def peak_flops(configured: float | None) -> float | None:
    if configured:
        return float(configured)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return flops
    return None
