"""Decision policies: should this step compute the middle blocks?

A policy is consulted by the gate once per transformer call, after the first
Fn blocks ran. Strategies that reuse work across steps (SCM masks, TeaCache,
...) plug in here as further policies; the gate, the step bookkeeping and the
residual buffers stay the same.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..options import DBCacheConfig
from .state import BranchState


class DBCachePolicy:
    """cache-dit's DBCache decision, in its order (DESIGN.md section 3)."""

    def __init__(self, config: DBCacheConfig):
        self.config = config
        self.warmup_steps = config.warmup_steps()
        self.mask = config.steps_computation_mask
        self.static = config.steps_computation_policy == "static"

    def compute(self, branch: BranchState, step: int, diff: Callable[[], Optional[float]]) -> tuple[bool, str]:
        """Return (compute?, reason). ``diff()`` measures the residual change lazily."""
        c = self.config
        if step in self.warmup_steps:
            return True, "warmup"
        if not branch.has_cache:
            return True, "nothing cached yet"
        if self.mask is not None and step < len(self.mask):
            if self.mask[step]:
                return True, "steps_computation_mask"
            if self.static:
                return False, "steps_computation_mask (static)"
        if 0 <= c.max_cached_steps <= len(branch.cached_steps):
            return True, "max_cached_steps"
        if 0 <= c.max_continuous_cached_steps <= branch.continuous_cached:
            return True, "max_continuous_cached_steps"
        if (c.max_accumulated_residual_diff_threshold is not None
                and branch.accumulated_diff >= c.max_accumulated_residual_diff_threshold):
            return True, "max_accumulated_residual_diff_threshold"
        if c.residual_diff_threshold <= 0:
            return True, "threshold 0"
        if c.residual_diff_threshold >= 1:
            return False, "threshold >= 1"
        d = diff()
        if d is None:
            return True, "no residual to compare"
        return (False, "diff below threshold") if d < c.residual_diff_threshold else (True, "diff above threshold")
