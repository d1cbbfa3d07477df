"""Step, generation and CFG-branch bookkeeping for one compiled model.

Nothing here is global: a ``ModelState`` belongs to one ``torch.compile`` call
and is shared by the graphs dynamo hands that call's backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..options import DBCacheConfig


@dataclass
class BranchState:
    """The cache of one CFG branch (cond or uncond) in one generation."""

    shape_key: tuple = ()
    prev_residual: Optional[torch.Tensor] = None    # Fn residual at the last computed step
    caches: dict = field(default_factory=dict)      # segment index -> list of residuals / values
    has_cache: bool = False
    computing: bool = True                          # decision for the current call
    continuous_cached: int = 0
    accumulated_diff: float = 0.0
    computed_steps: list = field(default_factory=list)
    cached_steps: list = field(default_factory=list)
    residual_diffs: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)     # step -> why it computed or cached


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


class ModelState:
    """Counts transformer calls into steps and generations.

    A generation starts on the first call, after ``refresh``, when
    ``num_inference_steps`` steps are done, when the timestep moves against the
    direction the generation took at its first change (falling and rising
    schedules alike), and when the first call of a step changes input shapes.
    With separate CFG a step has one call per branch; the branch of a call is
    its position within the step, so roles never swap between generations.
    """

    def __init__(self, config: DBCacheConfig):
        self.config = config
        self.num_inference_steps = config.num_inference_steps
        self.generation = -1
        self.timestep_input: Optional[str] = None
        self.chain_info: dict = {}
        self.warned: set[str] = set()
        self.observed_t: Optional[tuple[float, str]] = None   # from a plain graph earlier in the call
        self.first_plain_graph = None   # the first graph without a chain that ran
        self.graph_breaks: list[str] = []   # why dynamo split this model's forward, as it said
        self._refresh = False
        self._start(None)

    def _start(self, t: Optional[float]) -> None:
        self.generation += 1
        self.step = 0
        self.call_in_step = 0
        self.calls = 0
        self.direction = 0
        self.last_t = t
        self.branches: dict[int, BranchState] = {}
        self.max_calls_in_step = 1

    def refresh(self, num_inference_steps: Optional[int] = None) -> None:
        if num_inference_steps is not None:
            # validated by the config's own rules
            replace(self.config, num_inference_steps=num_inference_steps)
            self.num_inference_steps = num_inference_steps
        self._refresh = True

    def _same_step(self, t: Optional[float]) -> bool:
        sep = self.config.enable_separate_cfg
        if sep is True:
            return self.call_in_step < 1
        if sep is False or t is None:
            return False
        return t == self.last_t

    def begin_call(self, t: Optional[float], shape_key: tuple) -> tuple[int, int, BranchState]:
        """Advance the counters for one call; return (step, branch index, branch state)."""
        if self._refresh or self.calls == 0:
            if self.calls:
                self._start(t)
            self._refresh = False
        elif self._same_step(t):
            self.call_in_step += 1
        else:
            n = self.num_inference_steps
            moved = 0 if (t is None or self.last_t is None) else _sign(t - self.last_t)
            if (n is not None and self.step + 1 >= n) or (self.direction and moved == -self.direction):
                self._start(t)
            else:
                if not self.direction:
                    self.direction = moved
                self.step += 1
                self.call_in_step = 0
        branch = self.branches.get(self.call_in_step)
        if branch is not None and branch.shape_key != shape_key:
            if self.call_in_step == 0 and self.step > 0:
                self._start(t)   # a new shape on a step's first call: a new generation
            self.branches.pop(self.call_in_step, None)
            branch = None
        if branch is None:
            branch = self.branches[self.call_in_step] = BranchState(shape_key=shape_key)
        self.calls += 1
        self.last_t = t
        self.max_calls_in_step = max(self.max_calls_in_step, self.call_in_step + 1)
        return self.step, self.call_in_step, branch

    def branch_name(self, index: int) -> str:
        if self.max_calls_in_step == 1:
            return "all"
        first, second = ("uncond", "cond") if self.config.cfg_compute_first else ("cond", "uncond")
        return {0: first, 1: second}.get(index, f"call{index}")

    def steps_done(self) -> int:
        return self.step + 1 if self.calls else 0
