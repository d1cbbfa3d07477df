"""The rewritten graph at run time: compiled segments with a gate between them.

The gate decision stays in Python between compiled segments: no dynamo guard
depends on it, so computed and cached steps never recompile (DESIGN.md s. 2).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.taylor import taylor_update_
from ..passes.taylor import taylor_coefficients
from ..kernels.relative_l1 import relative_l1_reference
from ..passes.split import SplitPlan
from .context import CallContext
from .policy import DBCachePolicy
from .state import BranchState, ModelState


class _Call:
    """What the segments of one transformer call share."""

    def __init__(self, plan: tuple):
        self.plan = plan                                  # the segment layout of the graph running
        self.context: Optional[CallContext] = None       # the pipeline's name for the call, if it gave one
        self.timesteps: list = []                         # timestep tensors to read with the gate's diff
        self.shape_key: tuple = ()
        self.guess: Optional[BranchState] = None         # the branch predicted before the timestep is read
        self.step = 0
        self.branch: Optional[BranchState] = None


class FnGate(torch.nn.Module):
    """Runs the first-blocks segment, places the call, then decides whether the middle computes.

    ``run`` is the Fn segment with the gate fused in (``passes.residuals``): it
    takes the stored residual as one more input and returns the segment's
    outputs, then this step's residual and its relative L1 change.

    One host sync per call: the timestep (when the pipeline gave no step index)
    and the diff come back together in one ``tolist``. The diff is measured
    against the residual of the branch the state predicts before that read;
    only if the timestep then places the call elsewhere, in a branch with a
    residual of its own, is it measured again (a second read, on the rare call
    where the pattern of calls per step changes).
    """

    def __init__(self, run: Callable, hidden_in: int, call: _Call, policy: DBCachePolicy, state: ModelState,
                 read_timestep: Callable[[list], Optional[float]]):
        super().__init__()
        self.run, self.hidden_in = run, hidden_in
        self.call, self.policy, self.state = call, policy, state
        self.read_timestep = read_timestep

    def forward(self, *args):
        call, state = self.call, self.state
        hidden = args[self.hidden_in]
        guess = call.guess
        prev = guess.prev_residual if guess is not None else None
        if prev is not None and prev.shape != hidden.shape:
            prev = None
        # with no stored residual the fused diff is measured against zeros and ignored
        *outs, residual, diff = self.run(*args, prev if prev is not None else torch.zeros(
            hidden.shape, dtype=hidden.dtype, device=hidden.device))
        t, measured = None, None
        if state.needs_timestep(call.context) and call.timesteps:
            values = _read([*call.timesteps, diff] if prev is not None else call.timesteps)
            t = self.read_timestep(values[:len(call.timesteps)])
            measured = values[-1] if prev is not None else None
        step, b = state.begin_call(call.context, t, call.shape_key)
        call.step, call.branch = step, b
        if b.plan is not call.plan:
            if b.plan != call.plan:   # a graph dynamo compiled anew, cut otherwise: its caches start empty
                b.caches, b.has_cache = {}, False
            b.plan = call.plan

        def measure() -> Optional[float]:
            if b is guess and prev is not None:
                return measured if measured is not None else float(diff)
            if b.prev_residual is None or b.prev_residual.shape != hidden.shape:
                return None
            return float(relative_l1_reference(b.prev_residual, residual))

        compute, reason = self.policy.compute(b, step, lambda: self._diff(b, step, measure))
        b.computing = compute
        b.reasons[step] = reason
        if compute:
            b.prev_residual = residual
            b.continuous_cached = 0
            b.computed_steps.append(step)
        else:
            b.continuous_cached += 1
            b.cached_steps.append(step)
        return tuple(outs)

    def _diff(self, b: BranchState, step: int, measure: Callable[[], Optional[float]]) -> Optional[float]:
        """Measure (or, for a later CFG branch, maybe borrow) this step's diff and record it."""
        first = self.state.branches.get(self.state.step_first[1])
        if (first is not b and not self.state.config.cfg_diff_compute_separate
                and first is not None and step in first.residual_diffs):
            d = first.residual_diffs[step]
        else:
            d = measure()
            if d is None:
                return None
        b.residual_diffs[step] = d
        if d > 0:
            b.accumulated_diff += d
        return d


def _read(values: list) -> list[float]:
    """0-d tensors (any dtype, any device) to Python floats, in one device-to-host copy."""
    device = values[-1].device
    return torch.stack([v.to(device=device, dtype=torch.float32) for v in values]).tolist()


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
        # graphs of one model cut alike (a static graph and its dynamic-shape recompile) share caches
        self.call = _Call(tuple((s.kind, tuple(s.blocks), tuple(s.residual_of)) for s in plan.segments))
        policy = DBCachePolicy(state.config)
        order = state.config.taylorseer_order if state.config.enable_taylorseer else 0
        for k, (seg, run) in enumerate(zip(plan.segments, segments)):
            if k == plan.gate_segment:
                mod = FnGate(run, plan.gate_hidden_in, self.call, policy, state, self._choose_timestep)
            elif seg.kind == "mid":
                mod = CachedSegment(run, k, seg.residual_of, self.call, order, taylor.get(k))
            else:
                mod = Plain(run)
            setattr(plan.parent, seg.module_name, mod)

    def _timesteps(self, args) -> list:
        """The timestep tensors to read this call (no sync here): the chosen input once
        settled, every candidate until then, or the one an earlier graph saw."""
        if not self.timestep_inputs:
            seen, self.state.observed_t = self.state.observed_t, None
            if seen is None:
                return []
            self.state.timestep_input = f"{seen[1]} (seen in an earlier graph)"
            return [_timestep_key(seen[0])]
        self.state.timestep_input = self.timestep_names[self.timestep_choice]
        if self.timestep_settled:
            return [_timestep_key(args[self.timestep_inputs[self.timestep_choice]])]
        return [_timestep_key(args[i]) for i in self.timestep_inputs]

    def _choose_timestep(self, ts: list[float]) -> Optional[float]:
        """Of the candidates read, the one that moves (a constant one is guidance)."""
        if not ts:
            return None
        if self.timestep_settled:
            return ts[0]
        moved = [k for k, (a, b) in enumerate(zip(ts, self.prev_t)) if a != b] if self.prev_t else []
        if moved:
            if self.timestep_choice not in moved:   # we took a constant (guidance): switch
                self.timestep_choice = moved[0]
                self.state.retime(self.prev_t[moved[0]])
                self.state.timestep_input = self.timestep_names[moved[0]]
            self.timestep_settled = True
        self.prev_t = ts
        return ts[self.timestep_choice]

    def __call__(self, *args):
        call, state = self.call, self.state
        call.context = state.pipeline.current() if state.pipeline is not None else None
        call.timesteps = self._timesteps(args) if state.needs_timestep(call.context) else []
        call.shape_key = tuple(tuple(args[i].shape) for i in self.shape_inputs)
        call.guess = state.predict(call.context, call.shape_key)
        return self.plan.parent(*args)


def _timestep_key(t: torch.Tensor) -> torch.Tensor:
    """One number per call from a timestep of any dtype and shape: its largest entry
    (Wan 2.2 TI2V passes (B, seq_len) with 0 on the conditioning frame's tokens)."""
    return t.detach().amax()
