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


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) of images ``[..., H, W]``, in float64.

    A uniform ``window`` x ``window`` window with K1 = 0.01, K2 = 0.03 and
    unbiased (co)variances, as scikit-image's default; the window shrinks to
    the image for images smaller than it. Identical images give 1.0.
    """
    if x.shape != ref.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.dim() < 2:
        raise ValueError(f"ssim: expected images [..., H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    win = min(window, h, w)
    a = x.double().reshape(-1, 1, h, w)
    b = ref.double().reshape(-1, 1, h, w)
    mean = lambda t: torch.nn.functional.avg_pool2d(t, win, stride=1)
    n = win * win
    cov = n / (n - 1) if n > 1 else 1.0
    mu_a, mu_b = mean(a), mean(b)
    var_a = cov * (mean(a * a) - mu_a ** 2)
    var_b = cov * (mean(b * b) - mu_b ** 2)
    var_ab = cov * (mean(a * b) - mu_a * mu_b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * var_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
