"""Train the class-conditional digits FLUX transformer of ``bench/digits.py`` on CPU.

Rectified flow: ``x_t = (1 - t) x0 + t noise`` with logit-normal t, the transformer predicts
the velocity ``noise - x0``; labels are dropped to the null class 10% of the time for
classifier-free guidance. AdamW with linear warm-up and cosine decay; the EMA of the weights
is what gets saved. Afterwards it scores generated digits with the scikit-learn classifier,
saves a sample grid and writes the checkpoint's model card.

    nice -n 19 python bench/train_digits.py [--steps 2500] [--out bench/digits_dit]
    nice -n 19 python bench/train_digits.py --eval-only      # score an existing checkpoint

Requires scikit-learn (``pip install scikit-learn``).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from digits import (CHECKPOINT, NULL_CLASS, NUM_CLASSES, MODEL_CONFIG, accuracy, build_model, classifier,
                    load_digits, load_model, pack, sample, velocity)

EVAL_PER_CLASS = 20
EVAL_STEPS = (8, 14, 28)
GRID_PER_CLASS = 8


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move the parameters of ``ema`` towards those of ``model`` by ``1 - decay``."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def flow_loss(model: nn.ModuleDict, x0: torch.Tensor, labels: torch.Tensor, cfg_dropout: float) -> torch.Tensor:
    """Rectified-flow velocity MSE on a batch of packed images ``x0`` with logit-normal t."""
    n = len(x0)
    labels = torch.where(torch.rand(n) < cfg_dropout, NULL_CLASS, labels)
    t = torch.sigmoid(torch.randn(n))
    noise = torch.randn_like(x0)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    v = velocity(model["transformer"], x_t, t, model["conditioner"](labels))
    return F.mse_loss(v, noise - x0)


def train(args) -> dict:
    """Train, save the EMA weights to ``args.out`` and return the training statistics."""
    torch.manual_seed(args.seed)
    images, labels = load_digits("train")
    x0_all = pack(images)
    transformer, conditioner = build_model()
    model = nn.ModuleDict(dict(transformer=transformer, conditioner=conditioner)).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    losses = []
    start = time.perf_counter()
    with tqdm(range(args.steps), desc="train", mininterval=10) as bar:
        for step in bar:
            index = torch.randint(len(x0_all), (args.batch_size,))
            loss = flow_loss(model, x0_all[index], labels[index], args.cfg_dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{mean(losses[-100:]):.4f}", refresh=False)
            if (step + 1) % args.log_every == 0:
                tqdm.write(f"step {step + 1}: loss (last 100) {mean(losses[-100:]):.4f}")
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    ema["transformer"].save_pretrained(str(args.out))
    ema["conditioner"].save(args.out)
    return dict(steps=args.steps, wall_s=wall, first_loss=mean(losses[:100]), final_loss=mean(losses[-100:]),
                params=sum(p.numel() for p in transformer.parameters()))


def evaluate(transformer, conditioner, guidance: float, steps_list=EVAL_STEPS) -> dict[int, float]:
    """Classifier accuracy of ``EVAL_PER_CLASS`` generated digits per class, for each step count."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(EVAL_PER_CLASS)
    return {steps: accuracy(sample(transformer, conditioner, labels, steps=steps, guidance=guidance, seed=1), labels)
            for steps in steps_list}


def save_grid(images: torch.Tensor, path: Path, cols: int, scale: int = 4, gap: int = 2) -> None:
    """Write ``[N, 1, H, W]`` images in [0, 1] as a PNG grid of ``cols`` columns, each pixel ``scale`` wide."""
    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    tile_h, tile_w = h * scale + gap, w * scale + gap
    canvas = Image.new("L", (cols * tile_w + gap, rows * tile_h + gap), color=128)
    pixels = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    for i, img in enumerate(pixels):
        tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (gap + (i % cols) * tile_w, gap + (i // cols) * tile_h))
    canvas.save(path)


def write_card(out: Path, args, stats: dict, clf_accuracy: float, sample_accuracy: dict[int, float]) -> None:
    """Write ``out/README.md``: how the checkpoint was trained and how well it generates."""
    cfg = ", ".join(f"{k}={v}" for k, v in MODEL_CONFIG.items())
    acc = ", ".join(f"{steps} steps: {a:.1%}" for steps, a in sample_accuracy.items())
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".json", ".safetensors")) / 2 ** 20
    (out / "README.md").write_text(f"""# digits_dit

A class-conditional `FluxTransformer2DModel` ({stats['params'] / 1e6:.2f}M parameters) that generates
scikit-learn's digits (8x8, upsampled bilinearly to 16x16, FLUX-packed into 8x8 = 64 tokens of 2x2x1
pixels). Benchmark model for cachec; trained by `bench/train_digits.py`, helpers in `bench/digits.py`.

Config: {cfg}.

Conditioning: `conditioner.safetensors` holds, for each of the 10 classes and the null class 10
(classifier-free guidance), 4 learned text tokens (`encoder_hidden_states`, 4 x 64) and one pooled
vector (`pooled_projections`, 64); `txt_ids` are zeros, `img_ids` are (0, row, col).

    from diffusers import FluxTransformer2DModel
    transformer = FluxTransformer2DModel.from_pretrained("bench/digits_dit")   # the transformer alone
    from digits import load_model, sample                                       # with bench/ on sys.path
    transformer, conditioner = load_model("bench/digits_dit")
    images = sample(transformer, conditioner, labels=range(10), steps=28, guidance={args.guidance})

## Training

Rectified flow, x_t = (1 - t) x0 + t noise with t ~ logit-normal(0, 1), MSE on the velocity
noise - x0; labels dropped to the null class with probability {args.cfg_dropout}. {stats['steps']} steps
of batch {args.batch_size} on the 1437 training digits (stratified 80/20 split, seed 0), AdamW lr
{args.lr} (weight decay 0.01), {args.warmup} warm-up steps then cosine decay, gradient clipping 1.0;
EMA of the weights (decay {args.ema}) is saved, in float32. Trained in fp32, eager, with {args.threads} torch
thread(s) at nice 19 on a shared 2-core CPU, in {stats['wall_s'] / 60:.1f} minutes. Loss (mean of 100 steps): {stats['first_loss']:.3f} at the start,
{stats['final_loss']:.4f} at the end.

## Quality

Euler sampler from t = 1 to 0, guidance scale {args.guidance} as two separate calls per step
(cond, uncond). An RBF SVC trained on the same 16x16 training digits ({clf_accuracy:.1%} on the 360
held-out digits) reads {EVAL_PER_CLASS * NUM_CLASSES} generated digits ({EVAL_PER_CLASS} per class, seed 1)
as their class at {acc}. Samples: `bench/digits_samples.png`.

Checkpoint size: {size:.1f} MiB.
""")


def report(args, stats: dict | None) -> None:
    """Score the checkpoint in ``args.out``, save the sample grid and, after training, the model card."""
    transformer, conditioner = load_model(args.out)
    _, clf_accuracy = classifier()
    sample_accuracy = evaluate(transformer, conditioner, args.guidance)
    print(f"classifier held-out accuracy {clf_accuracy:.1%}; generated digits, guidance {args.guidance}: "
          + ", ".join(f"{steps} steps {a:.1%}" for steps, a in sample_accuracy.items()))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(GRID_PER_CLASS)
    save_grid(sample(transformer, conditioner, labels, guidance=args.guidance, seed=2), args.grid, GRID_PER_CLASS)
    if stats is not None:
        write_card(args.out, args, stats, clf_accuracy, sample_accuracy)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    ap.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of training on the null label")
    ap.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on a busy 2-core machine at nice 19 a second thread mostly waits "
                         "for a contended core (5-13 s per step against 0.8 s with one)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--grid", type=Path, default=Path(__file__).resolve().parent / "digits_samples.png")
    ap.add_argument("--eval-only", action="store_true", help="score the checkpoint in --out without training")
    return ap.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    stats = None if args.eval_only else train(args)
    if stats is not None:
        print(f"trained {stats['steps']} steps in {stats['wall_s'] / 60:.1f} min, final loss {stats['final_loss']:.4f}")
    report(args, stats)


if __name__ == "__main__":
    main()
