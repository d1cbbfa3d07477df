"""Metrics against values worked out by hand."""
import math

import pytest
import torch

from cachec.metrics import psnr, ssim


def test_psnr_one_wrong_pixel():
    ref = torch.zeros(1, 4, 4)
    x = ref.clone()
    x[0, 0, 0] = 1.0          # mse = 1/16 on a data range of 1: 10 log10(16)
    assert psnr(x, ref, data_range=1.0) == pytest.approx(10 * math.log10(16))


def test_psnr_does_not_wrap_around_like_uint8():
    ref = torch.full((8, 8), 0.99)
    x = torch.full((8, 8), 0.01)   # in uint8 x - ref would wrap to a small error
    assert psnr(x, ref, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.98 ** 2))


def test_psnr_identical_is_infinite_and_shapes_must_match():
    x = torch.rand(2, 3, 3)
    assert psnr(x, x) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[0])


def test_ssim_of_constant_images():
    # both constant: the variance terms vanish and SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01 ** 2
    got = ssim(torch.full((8, 8), a), torch.full((8, 8), b))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_of_a_negated_pattern():
    # zero-mean +-s checkerboard against its negation: means 0, var_ab = -var, so
    # SSIM = (C1 / C1) * (-2 var + C2) / (2 var + C2) with var the unbiased window variance
    s, n = 0.5, 49
    board = s * (1 - 2 * ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2)).double()
    # a 7x7 window over a checkerboard holds 25 of one sign and 24 of the other
    mean = s * (25 - 24) / n
    var = n / (n - 1) * (s * s - mean ** 2)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = ((-2 * mean * mean + c1) / (2 * mean * mean + c1)) * ((-2 * var + c2) / (2 * var + c2))
    got = ssim(board, -board)
    assert got == pytest.approx(want, rel=1e-9)


def test_ssim_identical_is_one():
    x = torch.rand(3, 16, 16)
    assert ssim(x, x) == pytest.approx(1.0)
