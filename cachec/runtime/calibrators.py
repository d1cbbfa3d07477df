"""Calibrators: how a cached step predicts a residual from the ones stored on computed steps.

Every calibrator predicts a linear combination of tensors it stored, with
coefficients worked out on the host: the cached output is
``base + sum_k coefs[k] * terms[k]``, one compiled pass (``plan`` module
docstring, "combination"). ``CALIBRATORS`` maps each config type to its class;
docs/design.md ("Calibrators") states the rules and where they differ from
cache-dit.

All terms are fp32 and contiguous, shaped like the residual, so one compiled
combination serves every step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels.taylor import taylor_update_
from ..options import FoCaCalibratorConfig, TaylorSeerCalibratorConfig


# cache-dit takes Taylor derivatives only from a generation's step 3 on: its per-tensor state is
# made at the first computed step with its step counter at -1 (one behind), and differentiates
# once that counter passes 1. Before, a computed step keeps only d[0] = R. cachec does the same
# (the bench's parity, and on the digits model +6 dB at order 2: early steps move fast).
TAYLOR_DERIVATIVES_FROM = 3


class TaylorSeer:
    """TaylorSeer's derivative table of one residual.

    On each computed step, ``n`` steps after the previous one: ``d[0] = R``,
    ``d[i+1] = (d[i]_new - d[i]_old) / n``; orders appear one update at a time,
    from step ``TAYLOR_DERIVATIVES_FROM`` on (before it, only ``d[0]``).
    ``k`` steps after the last computed step the residual is
    ``sum_i d[i] * k**i / i!``; orders not reached yet are zeros. Exact on
    polynomials of degree <= order once order + 1 computed steps were seen,
    the last ``order`` of them from that step on.
    """

    keep = False

    @staticmethod
    def terms(config: TaylorSeerCalibratorConfig) -> int:
        """How many stored tensors a prediction combines."""
        return config.taylorseer_order + 1

    def __init__(self, config: TaylorSeerCalibratorConfig):
        self.order = config.taylorseer_order
        self.derivs: Optional[torch.Tensor] = None
        self.valid, self.last = 0, None

    def update(self, residual: torch.Tensor, step: int) -> None:
        if self.derivs is None or self.derivs.shape[1:] != residual.shape:
            self.derivs = residual.new_zeros((self.order + 1, *residual.shape), dtype=torch.float32)
            self.valid, self.last = 0, None
        n = 1 if self.last is None else step - self.last
        self.valid = min(self.valid + 1, self.order + 1) if step >= TAYLOR_DERIVATIVES_FROM else 1
        taylor_update_(self.derivs[:self.valid], residual.contiguous(), float(n))
        self.last = step

    def combination(self, step: int) -> tuple[list[torch.Tensor], list[float]]:
        k = step - self.last
        coefs = [k ** i / math.factorial(i) for i in range(self.order + 1)]
        return list(self.derivs.unbind(0)), coefs

    def kept(self, prediction: torch.Tensor, step: int) -> None:
        pass


class FoCa:
    """FoCa (Forecast then Calibrate, cache-dit's second calibrator) for one residual.

    Keeps the last two computed values ``F_full`` (step ``s1``) and
    ``F_full_prev`` (``s0``), and a rolling window ``F_k``, ``F_km1`` of the two
    latest values, predictions included. ``e`` steps after ``s1`` it predicts
    ``F_full + a * (D_full + D_curr)`` with ``D_full = (F_full - F_full_prev) / (s1 - s0)``
    and ``D_curr = (F_k - F_km1) / (their step distance)`` (Heun's trapezoid
    anchored at the last computed step), ``a = e / 2`` up to a horizon of 3 steps
    and ``4.5 / e`` beyond it (cache-dit's damping toward the anchor). The
    prediction then enters the window, so consecutive cached steps recurse.

    cache-dit divides by 1 instead of the step distances (its "h = 1"), which
    after a run of cached steps takes a k-step difference for a one-step
    derivative; with the distances the prediction is exact on linear
    trajectories up to the horizon, whatever the schedule.
    """

    keep = True
    HORIZON = 3.0

    @staticmethod
    def terms(config: FoCaCalibratorConfig) -> int:
        return 4

    def __init__(self, config: FoCaCalibratorConfig):
        self.full = self.full_prev = None       # (tensor, step)
        self.k = self.km1 = None

    def update(self, residual: torch.Tensor, step: int) -> None:
        if self.full is not None and self.full[0].shape != residual.shape:
            self.full = self.full_prev = self.k = self.km1 = None
        value = (residual.float().contiguous(), step)
        self.full_prev, self.full = self.full, value
        self.km1, self.k = self.k, value

    def combination(self, step: int) -> tuple[list[torch.Tensor], list[float]]:
        full, step1 = self.full
        if self.full_prev is None or self.km1 is None:   # one value: reuse it
            return [full, full, full, full], [1.0, 0.0, 0.0, 0.0]
        prev, step0 = self.full_prev
        fk, sk = self.k
        fkm1, skm1 = self.km1
        e = step - step1
        a = e / 2 if e <= self.HORIZON else self.HORIZON * self.HORIZON / 2 / e
        g_full, g_cur = step1 - step0, sk - skm1
        return [full, prev, fk, fkm1], [1 + a / g_full, -a / g_full, a / g_cur, -a / g_cur]

    def kept(self, prediction: torch.Tensor, step: int) -> None:
        self.km1, self.k = self.k, (prediction, step)


CALIBRATORS = {TaylorSeerCalibratorConfig: TaylorSeer, FoCaCalibratorConfig: FoCa}


def lookup(table: dict, config, kind: str) -> type:
    """The handler class ``table`` maps ``type(config)`` to, or a ValueError naming the choices."""
    try:
        return table[type(config)]
    except KeyError:
        raise ValueError(f"no {kind} for {type(config).__name__}: expected one of "
                         f"{[c.__name__ for c in table]}") from None


def calibrator_for(config) -> type:
    """The calibrator class for a calibrator config (``CALIBRATORS``)."""
    return lookup(CALIBRATORS, config, "calibrator")
