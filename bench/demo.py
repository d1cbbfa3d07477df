"""cachec demo: the bundled trained digits DiT, uncached and under a few cache settings.

Generates the same grid of digits (classifier-free guidance as two separate
transformer calls per step, 28 Euler steps) with plain torch.compile and with
cachec, then prints per setting: wall-time ratio against plain compile,
computed steps, PSNR and SSIM against the uncached images, and the accuracy
of a scikit-learn digit classifier on the generated images. Saves a PNG grid.

    python bench/demo.py [--steps 28] [--per-class 4] [--inner inductor] [--png out/demo.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits  # noqa: E402

import cachec  # noqa: E402
from cachec.metrics import psnr, ssim  # noqa: E402

SETTINGS = {
    "uncached (torch.compile)": None,
    "F1B0 r=0.08": {"residual_diff_threshold": 0.08, "max_continuous_cached_steps": 3},
    "F1B0 r=0.16": {"residual_diff_threshold": 0.16, "max_continuous_cached_steps": 3},
    "F1B0 r=0.24": {"residual_diff_threshold": 0.24, "max_continuous_cached_steps": 3},
    "F2B1 r=0.24": {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.24,
                    "max_continuous_cached_steps": 3},
}


def compiled_transformer(transformer, inner: str, options: dict | None, steps: int):
    torch._dynamo.reset()
    if options is None:
        return torch.compile(transformer, backend=inner)
    return torch.compile(transformer, backend="cachec",
                         options={"inner_backend": inner, "num_inference_steps": steps, **options})


def generate(model, conditioner, labels, steps: int, bar, seed: int = 0) -> torch.Tensor:
    def call(**kw):
        bar.update(1)   # two transformer calls (cond, uncond) per step
        return model(**kw)
    return digits.sample(model, conditioner, labels, steps=steps, seed=seed, transformer_call=call)


def save_grid(rows: dict[str, torch.Tensor], path: str, scale: int = 3) -> None:
    """One row of digits per setting, its name on the left."""
    first = next(iter(rows.values()))
    n, size = len(first), first.shape[-1] * scale
    label_w, pad = 190, 2
    grid = Image.new("L", (label_w + n * (size + pad), len(rows) * (size + pad)), 255)
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows.items()):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), name, fill=0)
        for c, img in enumerate(images):
            tile = Image.fromarray((img[0].numpy() * 255).round().astype("uint8")).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_w + c * (size + pad), y))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--per-class", type=int, default=4, help="digits of each class per generation")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--png", default="out/demo.png")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformer, conditioner = digits.load_model()
    labels = [c for c in range(digits.NUM_CLASSES) for _ in range(args.per_class)]
    results, images = [], {}
    with torch.no_grad():
        for name, options in SETTINGS.items():
            model = compiled_transformer(transformer, args.inner, options, args.steps)
            with tqdm(total=2 * args.steps, desc=f"{name}", unit="call", leave=False) as bar:
                bar.set_postfix_str("compiling")
                generate(model, conditioner, labels, args.steps, bar, seed=99)   # compile and warm up
                bar.reset()
                bar.set_postfix_str("timed run")
                start = time.perf_counter()
                out = generate(model, conditioner, labels, args.steps, bar)
                elapsed = time.perf_counter() - start
            computed = args.steps if options is None else len(cachec.summary(model).computed_steps)
            images[name] = out
            results.append((name, elapsed, computed, out))
    ref = results[0][3]
    base = results[0][1]
    print(f"\ndigits DiT ({sum(p.numel() for p in transformer.parameters()) / 1e6:.1f}M params), "
          f"{len(labels)} digits, {args.steps} steps, CFG as two calls per step, inner backend {args.inner}")
    print(f"{'setting':<26}{'speedup':>9}{'computed':>10}{'PSNR dB':>9}{'SSIM':>7}{'accuracy':>10}")
    for name, elapsed, computed, out in results:
        q = psnr(out, ref, data_range=1.0)
        print(f"{name:<26}{base / elapsed:>8.2f}x{computed:>6}/{args.steps:<3}{q:>9.1f}"
              f"{ssim(out, ref):>7.3f}{digits.accuracy(out, labels):>9.1%}")
    save_grid({n: im[::args.per_class] for n, im in images.items()}, args.png)
    print(f"\nPNG grid (one digit of each class per setting): {args.png}")


if __name__ == "__main__":
    main()
