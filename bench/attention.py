"""Forward+backward of one attention layer over packed rows: every path of `model.attn_impl` as a ratio to the dense
block-diagonal mask, side by side in one run (repeats interleaved: the machine may be shared), medians reported.

Length mixes, rows of T points:
- full:      every row one full window (the only mix `causal` is exact on)
- time300b:  pieces drawn log-uniformly from 64 to T points, packed in order and cut at the row end (Time-300B's
             sequences are mostly short, a few span whole windows)
- short:     many pieces under 256 points
Each timing includes building the layout (done once per forward for all layers in the model, so this overstates
it). Paths without a backward on this device (FlexAttention on CPU) are left out. The last line is the speed-up of
the path `auto` picks here over the dense mask on the Time-300B-like mix.

    python bench/attention.py [--tokens 4096] [--rows 1] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from timemoe_train.model import TimeMoeConfig
from timemoe_train.model.attention import AttentionLayout, packed_positions, resolve_attn_impl
from timemoe_train.model.modeling import TimeMoeAttention, rotary_cos_sin


def packed_row(T: int, draw, gen: torch.Generator) -> torch.Tensor:
    ids, at, i = torch.empty(T, dtype=torch.long), 0, 0
    while at < T:
        n = min(draw(T, gen), T - at)
        ids[at:at + n] = i
        at, i = at + n, i + 1
    return ids


MIXES = {
    "full": lambda T, g: T,
    "time300b": lambda T, g: int(math.exp(math.log(64) + float(torch.rand((), generator=g)) * math.log(T / 64))),
    "short": lambda T, g: int(torch.randint(1, 256, (), generator=g)),
}


def paths(device: torch.device, mix: str) -> list[str]:
    out = ["dense_mask", "varlen"]
    if device.type == "cuda":
        out.append("flex")
    if mix == "full":
        out.append("causal")
    return out


def time_fwd_bwd(layer, x_BTD, ids_BT, impl, head_dim, theta) -> float:
    sync = torch.cuda.synchronize if x_BTD.is_cuda else (lambda: None)
    x = x_BTD.detach().requires_grad_(True)
    sync()
    start = time.perf_counter()
    layout = AttentionLayout.build(impl, ids_BT, ids_BT.shape[1], 0, x.device)
    cos, sin = rotary_cos_sin(packed_positions(ids_BT), head_dim, theta, x.dtype)
    out = layer(x, (cos.transpose(1, 2), sin.transpose(1, 2)), layout)
    out.backward(torch.ones_like(out))
    sync()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="points per row (T)")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = TimeMoeConfig.preset(args.preset)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layer = TimeMoeAttention(config).to(device, dtype)
    gen = torch.Generator().manual_seed(0)
    x_BTD = torch.randn(args.rows, args.tokens, config.hidden_size, device=device, dtype=dtype)
    batches = {mix: torch.stack([packed_row(args.tokens, draw, gen) for _ in range(args.rows)]).to(device)
               for mix, draw in MIXES.items()}
    times = {(mix, impl): [] for mix in MIXES for impl in paths(device, mix)}
    for r in range(args.warmup + args.repeats):
        for (mix, impl) in times:
            layer.zero_grad(set_to_none=True)
            t = time_fwd_bwd(layer, x_BTD, batches[mix], impl, config.head_dim, config.rope_theta)
            if r >= args.warmup:
                times[(mix, impl)].append(t)

    print(f"attention fwd+bwd, preset={args.preset} (H={config.hidden_size}, {config.num_attention_heads} heads), "
          f"{args.rows} x {args.tokens} points, {device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats (median)")
    for mix, ids in batches.items():
        runs = [torch.unique_consecutive(row, return_counts=True)[1] for row in ids.cpu()]
        pieces = sum(len(r) for r in runs)
        cost = sum(float((r.double() ** 2).sum()) for r in runs) / (args.rows * args.tokens**2)
        dense = statistics.median(times[(mix, "dense_mask")])
        cells = "   ".join(f"{impl} {statistics.median(times[(mix, impl)]) * 1e3:7.0f} ms "
                           f"x{dense / statistics.median(times[(mix, impl)]):5.2f}" for impl in paths(device, mix))
        print(f"  {mix:<9} {pieces:4d} pieces, Σlen²/T² = {cost:.3f}:   {cells}")
    auto = resolve_attn_impl("auto", device)
    speedup = statistics.median(times[("time300b", "dense_mask")]) / statistics.median(times[("time300b", auto)])
    print(f"(x = dense_mask time / path time; auto picks {auto} on {device.type})")
    print(f"packed attention speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
