"""Efficiency on a compute-bound model: measured speedup over the FLOP-ideal one, cachec and cache-dit side by side.

A FLUX-shaped random-weight FluxTransformer2DModel (2 double-stream + 8 single-stream blocks, hidden 512,
1024 image + 64 text tokens, batch 1, fp32) generates with 28 Euler steps of a rectified flow, one
transformer call per step. Caching follows a fixed schedule: cache-dit's "fast" steps computation mask
(11 of 28 steps computed) with the static policy, so no decision depends on the weights. Fn=1, Bn=0:
the middle blocks are transformer_blocks[1:] and all single_transformer_blocks.

Each system is timed as the fastest of --repeats generations after a warm-up generation (which
compiles), with plain torch.compile(model, backend="inductor") timed right before and right after it;
its speedup is against the faster of that pair, so the machine's drift over minutes cancels:

    cachec     torch.compile(model, backend="cachec", options={...mask, static...})
    cache-dit  cache_dit.enable_cache(...) + cache_dit.set_compile_configs() + torch.compile(model)

set_compile_configs() changes global inductor configs for the rest of the process: cache-dit runs
last, and the plain pair around it runs under the same configs.
The FLOP-ideal speedup is steps * total / (steps * total - cached_steps * middle), with the FLOPs of
one call counted per module by torch.utils.flop_counter; efficiency = measured speedup / ideal.
Writes the table to out/efficiency.csv.

    python bench/efficiency.py                  # full size, "fast" mask (about 15 minutes on 2 idle cores)
    python bench/efficiency.py --mask medium    # 15 of 28 steps computed
    python bench/efficiency.py --quick          # tiny model, 6 steps: a smoke run of a minute or two
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from dataclasses import dataclass

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cachec
from cachec.kernels.relative_l1 import relative_l1_reference

FN, BN = 1, 0   # cache-dit's / cachec's Fn_compute_blocks, Bn_compute_blocks
SEED = 0
# (compute bins, cache bins), alternating and starting with compute; "fast" and "medium" are cache-dit's
MASK_BINS = {
    "fast": ([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]),      # 11 of 28 computed
    "medium": ([6, 2, 2, 2, 2, 1], [1, 3, 3, 3, 3]),    # 15 of 28 computed
    "quick": ([2, 1], [3]),                             # 3 of 6 computed: 110001
}
FULL = {"steps": 28, "mask": "fast", "double": 2, "single": 8, "heads": 4, "head_dim": 128, "text_dim": 256,
        "in_channels": 64, "grid": 32, "text_tokens": 64}
QUICK = {"steps": 6, "mask": "quick", "double": 2, "single": 3, "heads": 2, "head_dim": 32, "text_dim": 32,
         "in_channels": 16, "grid": 8, "text_tokens": 16}


@dataclass
class Row:
    system: str
    computed: int
    steps: int
    seconds: float
    ideal: float
    speedup: float = float("nan")

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal


def mask_from_bins(compute_bins: list[int], cache_bins: list[int], steps: int) -> list[int]:
    """1 (compute) / 0 (cache) per step: compute_bins[0] ones, cache_bins[0] zeros, compute_bins[1] ones, ..."""
    mask = cachec.steps_mask(compute_bins, cache_bins)
    if len(mask) != steps:
        raise ValueError(f"the bins {compute_bins} / {cache_bins} give {len(mask)} steps, not {steps}")
    return mask


def build_model(a) -> torch.nn.Module:
    """Seeded random-weight FLUX.1-schnell-style transformer (no guidance embedding)."""
    rope_t = a.head_dim // 8   # (16, 56, 56) for head dim 128, as FLUX
    rope_h = (a.head_dim - rope_t) // 2
    rope = (rope_t, rope_h, a.head_dim - rope_t - rope_h)
    torch.manual_seed(SEED)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=a.in_channels, num_layers=a.double, num_single_layers=a.single,
        attention_head_dim=a.head_dim, num_attention_heads=a.heads, joint_attention_dim=a.text_dim,
        pooled_projection_dim=a.text_dim, guidance_embeds=False, axes_dims_rope=rope)
    return model.eval()


def make_inputs(a) -> dict:
    """Latent noise and text conditioning as FluxPipeline hands them to the transformer."""
    g = torch.Generator().manual_seed(SEED + 1)
    img_ids = torch.zeros(a.grid, a.grid, 3)
    img_ids[..., 1] = torch.arange(a.grid)[:, None]
    img_ids[..., 2] = torch.arange(a.grid)[None, :]
    return {
        "hidden_states": torch.randn(1, a.grid * a.grid, a.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, a.text_tokens, a.text_dim, generator=g),
        "pooled_projections": torch.randn(1, a.text_dim, generator=g),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(a.text_tokens, 3),
        "guidance": None,
    }


def generate(model, inputs: dict, steps: int, bar=None) -> torch.Tensor:
    """Euler steps x <- x + (t_next - t) * v of a rectified flow from t=1 (noise) to t=0."""
    ts = torch.linspace(1, 0, steps + 1)
    x = inputs["hidden_states"]
    for i in range(steps):
        v = model(**{**inputs, "hidden_states": x, "timestep": ts[i].reshape(1)}, return_dict=False)[0]
        x = x + (ts[i + 1] - ts[i]) * v
        if bar is not None:
            bar.update(1)
    return x


def timed_generation(model, inputs: dict, steps: int, name: str, repeats: int,
                     before=None) -> tuple[float, torch.Tensor]:
    """Fastest of ``repeats`` generations after a warm-up one; ``before()`` runs ahead of each."""
    times = []
    with tqdm(total=steps * (1 + repeats), desc=name, unit="step", leave=False) as bar:
        for i in range(1 + repeats):
            bar.set_postfix_str("warm-up (compiles)" if i == 0 else "timed")
            if before:
                before()
            start = time.perf_counter()
            out = generate(model, inputs, steps, bar)
            times.append(time.perf_counter() - start)
    return min(times[1:]), out


def middle_blocks(model) -> list[str]:
    """Module paths of the blocks cached with Fn=FN, Bn=BN: the chain double + single blocks less its ends."""
    chain = ([f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
             + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])
    return chain[FN:len(chain) - BN]


def count_flops(model, inputs: dict, middle: list[str]) -> tuple[int, int]:
    """(total, middle) FLOPs of one eager call, the middle summed over its blocks' module entries."""
    # CPU SDPA dispatches to an op flop_counter has no formula for; count it as the other SDPA kernels
    sdpa_cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_cpu) as mode:
        model(**inputs, timestep=torch.ones(1), return_dict=False)
    counts = mode.get_flop_counts()   # keyed "Global" and by module path: "FluxTransformer2DModel.transformer_blocks.0"
    root = type(model).__name__
    missing = [b for b in middle if f"{root}.{b}" not in counts]
    if missing:
        raise KeyError(f"no FLOP count for {missing}; keys look like {list(counts)[:4]}")
    return sum(counts["Global"].values()), sum(sum(counts[f"{root}.{b}"].values()) for b in middle)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b|, cachec's own diff definition."""
    return float(relative_l1_reference(b, a))


def ideal_speedup(steps: int, cached: int, total: int, middle: int) -> float:
    return steps * total / (steps * total - cached * middle)


def run_plain(model, inputs: dict, steps: int, name: str, repeats: int) -> tuple[float, torch.Tensor]:
    torch._dynamo.reset()
    return timed_generation(torch.compile(model, backend="inductor"), inputs, steps, name, repeats)


def run_cachec(model, inputs: dict, mask: list[int], middle: list[str], repeats: int) -> tuple[float, torch.Tensor]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cachec", options={
        "Fn_compute_blocks": FN, "Bn_compute_blocks": BN, "steps_computation_mask": mask,
        "steps_computation_policy": "static", "max_warmup_steps": 0, "inner_backend": "inductor"})
    seconds, out = timed_generation(compiled, inputs, len(mask), "cachec", repeats)
    s = cachec.summary(compiled)
    print("cachec segments: " + " | ".join(f"{kind}[{', '.join(blocks)}]" if blocks else kind
                                          for kind, blocks in s.segments))
    expected = [i for i, m in enumerate(mask) if m]
    assert s.computed_steps == expected, f"cachec computed {s.computed_steps}, the mask says {expected}"
    mid = [b for kind, blocks in s.segments if kind == "mid" for b in blocks]
    assert mid == middle, f"cachec's middle segments hold {mid}, the FLOP count assumes {middle}"
    return seconds, out


def run_cache_dit(model, inputs: dict, mask: list[int], repeats: int) -> tuple[float, torch.Tensor]:
    """cache-dit's transformer-only use with its torch.compile recommendation; call set_compile_configs() first."""
    import cache_dit
    steps = len(mask)
    cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=FN, Bn_compute_blocks=BN, max_warmup_steps=0, num_inference_steps=steps,
        steps_computation_mask=mask, steps_computation_policy="static", enable_separate_cfg=False))
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def refresh():   # transformer-only, cache-dit carries its step count across generations otherwise
        cache_dit.refresh_context(model, num_inference_steps=steps)
    seconds, out = timed_generation(compiled, inputs, steps, "cache-dit", repeats, before=refresh)
    stats = [s for s in cache_dit.summary(model, logging=False) if s.cache_options]
    cached = sorted(set(stats[0].cached_steps))
    expected = [i for i, m in enumerate(mask) if not m]
    assert cached == expected, f"cache-dit cached {cached}, the mask says {expected}"
    return seconds, out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 6 steps, short mask: a smoke run")
    ap.add_argument("--steps", type=int, help=f"denoising steps ({FULL['steps']})")
    ap.add_argument("--mask", choices=list(MASK_BINS), help=f"steps computation mask ({FULL['mask']})")
    ap.add_argument("--double", type=int, help=f"double-stream blocks, num_layers ({FULL['double']})")
    ap.add_argument("--single", type=int, help=f"single-stream blocks, num_single_layers ({FULL['single']})")
    ap.add_argument("--heads", type=int, help=f"attention heads ({FULL['heads']})")
    ap.add_argument("--head-dim", type=int, help=f"attention head dim ({FULL['head_dim']})")
    ap.add_argument("--text-dim", type=int, help=f"joint_attention_dim and pooled_projection_dim ({FULL['text_dim']})")
    ap.add_argument("--in-channels", type=int, help=f"latent channels per token ({FULL['in_channels']})")
    ap.add_argument("--grid", type=int, help=f"image tokens per side ({FULL['grid']}: {FULL['grid'] ** 2} tokens)")
    ap.add_argument("--text-tokens", type=int, help=f"text tokens ({FULL['text_tokens']})")
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per measurement; the fastest counts")
    ap.add_argument("--csv", default="out/efficiency.csv")
    args = ap.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_table(rows: list[Row]) -> None:
    print(f"{'system':<40}{'computed':>10}{'s/gen':>9}{'speedup':>9}{'ideal':>8}{'efficiency':>12}")
    for r in rows:
        print(f"{r.system:<40}{r.computed:>6}/{r.steps:<3}{r.seconds:>9.2f}{r.speedup:>8.2f}x{r.ideal:>7.2f}x"
              f"{r.efficiency:>12.1%}")


def write_csv(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "computed_steps", "steps", "s_per_generation", "speedup_vs_plain",
                    "flop_ideal_speedup", "efficiency"])
        for r in rows:
            w.writerow([r.system, r.computed, r.steps, f"{r.seconds:.4f}", f"{r.speedup:.4f}", f"{r.ideal:.4f}",
                        f"{r.efficiency:.4f}"])


def main():
    args = parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    mask = mask_from_bins(*MASK_BINS[args.mask], args.steps)
    steps, computed = len(mask), sum(mask)
    model = build_model(args)
    inputs = make_inputs(args)
    middle = middle_blocks(model)
    total_flops, middle_flops = count_flops(model, inputs, middle)
    ideal = ideal_speedup(steps, steps - computed, total_flops, middle_flops)
    print(f"FLUX-shaped model: {args.double} double + {args.single} single blocks, "
          f"hidden {args.heads * args.head_dim}, "
          f"{args.grid ** 2} image + {args.text_tokens} text tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {torch.get_num_threads()} threads")
    print(f"mask '{args.mask}': {''.join(map(str, mask))} ({computed} of {steps} computed), Fn={FN} Bn={BN}")
    print(f"FLOPs per call: {total_flops / 1e9:.2f} GFLOP = always-run {(total_flops - middle_flops) / 1e9:.2f}"
          f" + middle {middle_flops / 1e9:.2f} ({len(middle)} blocks)")

    rows, outs = [], {}
    with torch.no_grad():
        # Plain is timed right before and right after each cached system, under the same global
        # configs: the machine's speed drifts by several percent over minutes, the pairs do not.
        def plain_pair(label: str, run) -> None:
            before, outs["plain"] = run_plain(model, inputs, steps, f"plain, before {label}", args.repeats)
            seconds, outs[label] = run()
            after, _ = run_plain(model, inputs, steps, f"plain, after {label}", args.repeats)
            base = min(before, after)
            rows.append(Row(f"plain torch.compile (around {label})", steps, steps, base, 1.0, 1.0))
            rows.append(Row(label, computed, steps, seconds, ideal, base / seconds))
            print(f"plain torch.compile: {before / steps:.3f} s per step before {label}, {after / steps:.3f} after"
                  + ("" if base / steps >= 0.5 or args.quick else " (below 0.5 s: not compute-bound enough)"))

        plain_pair("cachec", lambda: run_cachec(model, inputs, mask, middle, args.repeats))
        import cache_dit  # only now: nothing of it may touch the rows above
        if args.mask in ("fast", "medium"):
            assert mask == cache_dit.steps_mask(total_steps=steps, mask_policy=args.mask), "not cache-dit's mask"
        cache_dit.set_compile_configs()   # global inductor configs: the plain pair around cache-dit has them too
        fresh = build_model(args)
        fresh.load_state_dict(model.state_dict())
        plain_pair("cache-dit", lambda: run_cache_dit(fresh, inputs, mask, args.repeats))

    print()
    print_table(rows)
    print("final latent, relative L1 difference: " + ", ".join(
        f"{a} vs {b} {relative_l1(outs[a], outs[b]):.2e}"
        for a, b in [("cachec", "plain"), ("cache-dit", "plain"), ("cachec", "cache-dit")]))
    write_csv(rows, args.csv)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
