"""The rewritten graph at run time: compiled segments with a gate between them.

The gate decision stays in Python between compiled segments: no dynamo guard
depends on it, so computed and cached steps never recompile (DESIGN.md s. 2).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.taylor import taylor_update_
from ..passes.taylor import taylor_coefficients
from ..passes.split import SplitPlan
from .policy import DBCachePolicy
from .state import BranchState, ModelState


class _Call:
    """What the segments of one transformer call share."""

    step: int = 0
    branch_index: int = 0
    branch: BranchState


class FnGate(torch.nn.Module):
    """Runs the first-blocks segment, then decides whether the middle computes.

    ``run`` is the Fn segment with the gate fused in (``passes.residuals``): it
    takes the stored residual as one more input and returns the segment's
    outputs, then this step's residual and its relative L1 change.
    """

    def __init__(self, run: Callable, hidden_in: int, call: _Call, policy: DBCachePolicy, state: ModelState):
        super().__init__()
        self.run, self.hidden_in = run, hidden_in
        self.call, self.policy, self.state = call, policy, state

    def forward(self, *args):
        call, b = self.call, self.call.branch
        hidden = args[self.hidden_in]
        prev = b.prev_residual
        if prev is not None and prev.shape != hidden.shape:
            prev = b.prev_residual = None
        # with no stored residual the fused diff is measured against zeros and ignored
        *outs, residual, diff = self.run(*args, prev if prev is not None else torch.zeros(
            hidden.shape, dtype=hidden.dtype, device=hidden.device))
        compute, reason = self.policy.compute(b, call.step, lambda: self._diff(b, prev, diff))
        b.computing = compute
        b.reasons[call.step] = reason
        if compute:
            b.prev_residual = residual
            b.continuous_cached = 0
            b.computed_steps.append(call.step)
        else:
            b.continuous_cached += 1
            b.cached_steps.append(call.step)
        return tuple(outs)

    def _diff(self, b: BranchState, prev: Optional[torch.Tensor], diff: torch.Tensor) -> Optional[float]:
        """Measure (or, for the second CFG branch, maybe borrow) this step's diff and record it."""
        step = self.call.step
        first = self.state.branches.get(0)
        if (self.call.branch_index == 1 and not self.state.config.cfg_diff_compute_separate
                and first is not None and step in first.residual_diffs):
            d = first.residual_diffs[step]
        elif prev is None:
            return None
        else:
            d = float(diff)
        b.residual_diffs[step] = d
        if d > 0:
            b.accumulated_diff += d
        return d


class TaylorSeries:
    """TaylorSeer's derivative table of one cached residual (DESIGN.md s. 3).

    On each computed step, ``n`` steps after the previous one: ``d[0] = R``,
    ``d[i+1] = (d[i]_new - d[i]_old) / n``; orders appear one update at a time
    (after the first computed step only ``d[0]``). ``k`` steps after the last
    computed step the residual is ``sum_i d[i] * k**i / i!``. Kept in fp32;
    orders not reached yet stay zero, so the sum may run over all of them.
    """

    def __init__(self, order: int):
        self.order, self.derivs, self.valid = order, None, 0

    def update(self, residual: torch.Tensor, n: int) -> None:
        if self.derivs is None or self.derivs.shape[1:] != residual.shape:
            self.derivs = residual.new_zeros((self.order + 1, *residual.shape), dtype=torch.float32)
            self.valid = 0
        self.valid = min(self.valid + 1, self.order + 1)
        taylor_update_(self.derivs[:self.valid], residual.contiguous(), float(n))


class CachedSegment(torch.nn.Module):
    """A middle segment: computes and stores its residuals, or reuses them.

    ``run`` is the segment compiled with its residuals fused in
    (``passes.residuals.fuse_residuals``): outputs first, then one residual
    per output paired with an input.

    With TaylorSeer (``taylor`` holds a compiled ``passes.taylor`` graph per
    output) a cached step extrapolates each residual from its derivative table
    instead of reusing it as it was.

    A cached output takes the layout (strides) of the computed one: the next
    compiled segment was compiled for it, and inductor asserts input strides
    (FLUX's single blocks return the image tokens as a view of the joint
    sequence, so the batch stride is not the contiguous one).
    """

    def __init__(self, run: Callable, index: int, residual_of: list, call: _Call,
                 taylor_order: int = 0, taylor: Optional[list] = None):
        super().__init__()
        self.run, self.index, self.residual_of, self.call = run, index, residual_of, call
        self.taylor_order, self.taylor = taylor_order, taylor

    def forward(self, *args):
        b = self.call.branch
        if b.computing:
            outs = self.run(*args)          # the outputs, then the residual of each paired one
            outs, residuals = outs[:len(self.residual_of)], iter(outs[len(self.residual_of):])
            if self.taylor_order:
                self._update_taylor(b, outs, residuals)
            else:
                b.caches[self.index] = [o if j is None else (next(residuals), o.size(), o.stride())
                                        for o, j in zip(outs, self.residual_of)]
            b.has_cache = True
            return tuple(outs)
        cached, coefs = [], None
        for m, (c, j) in enumerate(zip(b.caches[self.index], self.residual_of)):
            if j is None:                        # an output with no input to pair with: reused as it was
                cached.append(c)
                continue
            residual, size, stride = c
            x = args[j]
            if self.taylor_order:                # residual is a TaylorSeries
                if coefs is None:
                    coefs = taylor_coefficients(self.taylor_order, self.call.step - b.computed_steps[-1], x.device)
                out = self._layout(size, stride, x.dtype, x)
                self.taylor[m](out, x, residual.derivs, coefs)
                cached.append(out)
            else:
                cached.append(torch.add(x, residual, out=self._layout(size, stride, residual.dtype, x)))
        return tuple(cached)

    def _update_taylor(self, b: BranchState, outs, residuals) -> None:
        steps = b.computed_steps           # the gate has recorded this step already
        n = steps[-1] - steps[-2] if len(steps) > 1 else 1
        old = b.caches.get(self.index)
        entries = []
        for m, (o, j) in enumerate(zip(outs, self.residual_of)):
            if j is None:
                entries.append(o)
                continue
            series = old[m][0] if old is not None else TaylorSeries(self.taylor_order)
            series.update(next(residuals), n)
            entries.append((series, o.size(), o.stride()))
        b.caches[self.index] = entries

    @staticmethod
    def _layout(size, stride, dtype, like: torch.Tensor) -> torch.Tensor:
        """An empty tensor in the computed output's layout, on ``like``'s device."""
        return torch.empty_strided(size, stride, dtype=dtype, device=like.device)


class Plain(torch.nn.Module):
    def __init__(self, run: Callable):
        super().__init__()
        self.run = run

    def forward(self, *args):
        return self.run(*args)


class CachedGraph:
    """The callable the backend returns to dynamo for a graph with a block chain."""

    def __init__(self, plan: SplitPlan, segments: list[Callable], taylor: dict[int, list], state: ModelState,
                 timestep_inputs: dict[int, str], shape_inputs: list[int]):
        self.plan, self.state = plan, state
        self.timestep_inputs, self.timestep_names = list(timestep_inputs), list(timestep_inputs.values())
        self.shape_inputs = shape_inputs
        self.timestep_choice = 0
        self.timestep_settled = len(timestep_inputs) <= 1   # settled: only the chosen input is read
        self.prev_t: list = []
        self.call = _Call()
        policy = DBCachePolicy(state.config)
        order = state.config.taylorseer_order if state.config.enable_taylorseer else 0
        for k, (seg, run) in enumerate(zip(plan.segments, segments)):
            if k == plan.gate_segment:
                mod = FnGate(run, plan.gate_hidden_in, self.call, policy, state)
            elif seg.kind == "mid":
                mod = CachedSegment(run, k, seg.residual_of, self.call, order, taylor.get(k))
            else:
                mod = Plain(run)
            setattr(plan.parent, seg.module_name, mod)

    def _timestep(self, args) -> Optional[float]:
        if not self.timestep_inputs:
            seen, self.state.observed_t = self.state.observed_t, None
            if seen is None:
                return None
            self.state.timestep_input = f"{seen[1]} (seen in an earlier graph)"
            return seen[0]
        self.state.timestep_input = self.timestep_names[self.timestep_choice]
        if self.timestep_settled:   # one read (one device sync) per call
            return float(args[self.timestep_inputs[self.timestep_choice]].reshape(-1)[0])
        ts = [float(args[i].reshape(-1)[0]) for i in self.timestep_inputs]
        moved = [k for k, (a, b) in enumerate(zip(ts, self.prev_t)) if a != b] if self.prev_t else []
        if moved:
            if self.timestep_choice not in moved:   # we took a constant (guidance): switch
                self.timestep_choice = moved[0]
                self.state.last_t = self.prev_t[moved[0]]
                self.state.timestep_input = self.timestep_names[moved[0]]
            self.timestep_settled = True
        self.prev_t = ts
        return ts[self.timestep_choice]

    def __call__(self, *args):
        t = self._timestep(args)
        shape_key = (id(self),) + tuple(tuple(args[i].shape) for i in self.shape_inputs)
        self.call.step, self.call.branch_index, self.call.branch = self.state.begin_call(t, shape_key)
        return self.plan.parent(*args)
