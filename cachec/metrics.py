"""Image-quality metrics on float images, never on uint8 (no wraparound)."""
from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``x`` against ``ref`` in dB, computed in float64.

    ``data_range`` is the span of valid values (1.0 for images in [0, 1]); by
    default the span of ``ref``. Identical inputs give ``inf``.
    """
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} and {tuple(ref.shape)}")
    x, ref = x.double(), ref.double()
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    mse = float(((x - ref) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)
