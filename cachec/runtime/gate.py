"""The rewritten graph at run time: compiled segments with a gate between them.

The decisions stay in Python between compiled segments: no dynamo guard
depends on them, so computed and cached steps never recompile
(docs/design.md, "The runtime").
"""
from __future__ import annotations

import threading
import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..plan import GateLayout, SplitPlan, forward_of, l1_sums, split_region_outputs
from .context import CallContext
from .state import BranchState, ModelState, RegionCache, RequestState


class _Call(threading.local):
    """What the segments of one transformer call share: one per thread (a
    ``threading.local`` runs ``__init__`` again in each thread), so calls in
    two threads never see each other's step, branch or decisions."""

    def __init__(self, plan: tuple, n_segments: int):
        self.plan = plan                                  # the segment layout of the graph running
        self.request: Optional[RequestState] = None       # the request this call belongs to
        self.context: Optional[CallContext] = None       # the pipeline's name for the call, if it gave one
        self.timesteps: list = []                         # timestep tensors to read with the gate's signals
        self.shape_key: tuple = ()
        self.guess: Optional[BranchState] = None         # the branch predicted before the timestep is read
        self.step = 0
        self.branch: Optional[BranchState] = None
        self.compute: list = [True] * n_segments          # per segment index: does this region compute?
        self.pending: list = []                           # lagged signals measured during this call


class FnGate:
    """Runs the first-blocks segment, places the call, then lets the strategy decide
    which regions compute.

    ``run`` is the Fn segment with the strategy's signal fused in
    (``passes.residuals``; positions in ``plan.GateLayout``): it takes the
    stored tensors the signal compares with and returns the segment's outputs,
    the Fn residual (DBCache) and the signal's partial sums.

    One host sync per call: the timestep (when the pipeline gave no step index)
    and the sums come back together in one copy. The sums are measured against
    the branch the state predicts before that read; only if the timestep then
    places the call elsewhere, in a branch with records of its own, are they
    measured again (a second read, on the rare call where the pattern of calls
    per step changes).
    """

    def __init__(self, run: Callable, hidden_in: Optional[int], hidden_out: Optional[int], layout: GateLayout,
                 call: _Call, strategy, read_timestep: Callable[[list], Optional[float]], hidden_value=None,
                 group=None):
        self.run, self.hidden_in, self.hidden_out, self.layout = run, hidden_in, hidden_out, layout
        self.call, self.strategy = call, strategy
        self.read_timestep = read_timestep
        # Ulysses: the ranks hold slices of the tokens; their partial sums add up in one all-reduce
        self.ranks = RankAgreement(group) if group is not None else None
        # where the hidden states are made inside the segment (static shapes), what they look like
        self.like = None if hidden_in is not None or layout.eager_sums else _Like(hidden_value)

    def __call__(self, *args):
        call, strategy = self.call, self.strategy
        state = call.request
        guess = call.guess
        if self.layout.eager_sums:
            extra, measurable = [], False
        else:
            extra, measurable = strategy.signal_inputs(guess, self.like or args[self.hidden_in])
        outs, residual, sums = self.layout.split(self.run(*args, *extra))
        if self.layout.eager_sums:   # a symbolic shape: compare here, still on the device
            prev = guess.prev_residual if guess is not None else None
            measurable = prev is not None and prev.shape == residual.shape
            if measurable:
                sums = l1_sums(prev, residual)
        if strategy.lagged:   # measured during the request's previous call: read in this call's one sync
            sums, state.pending = state.pending, None
            measurable = sums is not None
        t, read = None, None
        if self.ranks is not None:
            ts = call.timesteps if state.needs_timestep(call.context) else []
            t, read = self.ranks.read(call, state, ts, sums, measurable, self.read_timestep, outs[0].device)
        elif state.needs_timestep(call.context) and call.timesteps:
            values = _read([*call.timesteps, sums] if measurable else call.timesteps)
            t = self.read_timestep(values[:len(call.timesteps)])
            read = values[len(call.timesteps):] if measurable else None
        step, b = state.begin_call(call.context, t, call.shape_key)
        call.step, call.branch = step, b
        if b.plan is not call.plan:
            if b.plan != call.plan:   # a graph dynamo compiled anew, cut otherwise: its caches start empty
                b.regions, b.has_cache = {}, False
            b.plan = call.plan

        def signals() -> Optional[list]:
            if strategy.lagged:
                return read if read is not None else (sums.flatten().tolist() if sums is not None else None)
            if b is guess and measurable:
                return read if read is not None else sums.flatten().tolist()
            measured = strategy.measure(b, None if self.hidden_out is None else outs[self.hidden_out], residual)
            return measured if self.ranks is None or measured is None else self.ranks.total(measured, residual)

        strategy.decide(call, b, step, signals, residual)
        return tuple(outs)


class RankAgreement:
    """The gate's one read under Ulysses: every rank measured its slice of the tokens,
    so the partial sums (sum|dR|, sum|R_prev| per signal) are all-reduced before the
    read, and the decision, taken from the sums, is the single-process one on every
    rank. With the sums travel fingerprints of what else the decision depends on
    (the timestep read, and the call's place in the request: generation, call count,
    step, branch, whether it measured), each as (x, x^2) of a small integer, so that
    after the reduce ``P * sum(x^2) == sum(x)^2`` holds exactly iff every rank had
    the same x. Every rank sees the same reduced values, so where they differ every
    rank raises at once, before the blocks whose collectives would deadlock."""

    def __init__(self, group):
        self.group, self.world = group, group.size()

    def read(self, call: _Call, state: RequestState, timesteps: list, sums, measurable: bool,
             read_timestep: Callable, device: torch.device) -> tuple[Optional[float], Optional[list]]:
        """(the timestep read, the sums over all ranks or None), after checking that every
        rank stands where this one does."""
        if sums is None or not measurable:   # same length on every rank: zeros where nothing is compared
            width = sums.numel() if sums is not None else 2
            sums = torch.zeros(width, dtype=torch.float64, device=device)
        guess = call.guess
        place = (state.generation, state.calls, state.steps, state.step, state.call_in_step, measurable,
                 None if guess is None else str(guess.key), None if call.context is None else
                 (call.context.name, call.context.step_index), call.shape_key)
        fingerprint = torch.tensor(float(zlib.crc32(repr(place).encode()) & 0xFFFFF), dtype=torch.float64)
        parts = [sums.detach().reshape(-1).to(device, torch.float64), _pair(fingerprint.to(device))]
        for t in timesteps:   # the bits of the float32 value, in two integers of 20 and 12 bits
            bits = t.to(device).float().reshape(1).view(torch.int32)
            parts += [_pair((bits & 0xFFFFF).double()), _pair((bits >> 20).double())]
        vec = torch.cat(parts)
        dist.all_reduce(vec, group=self.group)
        values = _read([*timesteps, vec], torch.float64)   # fingerprints squared need float64's 53 bits
        n_t = len(timesteps)
        reduced = values[n_t:]
        width = parts[0].numel()
        checks = reduced[width:]
        for k in range(0, len(checks), 2):
            if self.world * checks[k + 1] != checks[k] * checks[k]:
                what = ("the call's place in the generation (step, branch, calls so far, cached state)" if k == 0
                        else f"timestep {(k - 2) // 4}")   # pairs: place, then two per timestep
                raise RuntimeError(f"cachec: the {self.world} ranks of the Ulysses group disagree on "
                                   f"{what}: they would take different cache decisions and deadlock "
                                   f"in the next collective. Every rank must run the same pipeline calls with "
                                   f"the same timesteps and options (and refresh at the same points).")
        t = read_timestep(values[:n_t]) if n_t else None
        return t, (reduced[:width] if measurable else None)

    def total(self, local: list, like: torch.Tensor) -> list:
        """Signals measured outside the fused read (a call placed in another branch than
        predicted, the same on every rank), summed over the ranks."""
        vec = torch.tensor(local, dtype=torch.float64, device=like.device)
        dist.all_reduce(vec, group=self.group)
        return vec.tolist()


def _pair(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(1)
    return torch.cat([x, x * x])


class _Like:
    """Shape, dtype and device of a static tensor, for ``signal_inputs`` to compare with and
    make zeros like (the hidden states entering block 0, made inside the gate's segment)."""
    __slots__ = ("shape", "dtype", "device")

    def __init__(self, value: torch.Tensor):
        self.shape, self.dtype, self.device = torch.Size(value.shape), value.dtype, value.device


def _read(values: list, dtype: torch.dtype = torch.float32) -> list[float]:
    """Tensors (any dtype, shape and device) to one flat list of Python floats, in one
    device-to-host copy."""
    device = values[-1].device
    return torch.cat([v.detach().reshape(-1).to(device=device, dtype=dtype) for v in values]).tolist()


class Region:
    """A gated region (a stretch of blocks, or one block): computes and stores its
    residuals, or reuses them.

    ``run`` is the region compiled with its residuals fused in
    (``passes.residuals.fuse_residuals``; positions in ``plan``): outputs first,
    then one residual per output paired with an input.

    With a calibrator (``combine[m]`` holds the compiled combination graph of
    output m) a cached step predicts each residual from what the calibrator
    stored instead of reusing it as it was.

    A cached output takes the layout (strides) of the computed one: the next
    compiled segment was compiled for it, and inductor asserts input strides
    (FLUX's single blocks return the image tokens as a view of the joint
    sequence, so the batch stride is not the contiguous one).
    """

    def __init__(self, run: Callable, index: int, residual_of: list, call: _Call,
                 calibrators: Optional[list] = None, combine: Optional[list] = None,
                 hidden: Optional[tuple] = None):
        self.run, self.index, self.residual_of, self.call = run, index, residual_of, call
        self.n_outputs = len(residual_of)
        self.calibrators = calibrators or [None] * self.n_outputs   # per output: a calibrator factory or None
        self.combine = combine or [None] * self.n_outputs
        # per-block strategies: (hidden input index, position of its residual among the residuals)
        self.hidden = hidden
        self.measure: Optional[Callable] = None   # DiTango: a layer's measurement, before it runs

    def __call__(self, *args):
        call = self.call
        b = call.branch
        if self.measure is not None:
            self.measure(call, self.index, args)
        if call.compute[self.index]:
            outs, residuals = split_region_outputs(self.run(*args), self.n_outputs)
            self._store(b, args, outs, residuals, call.step)
            return tuple(outs)
        cached = []
        for m, (entry, j) in enumerate(zip(b.regions[self.index].entries, self.residual_of)):
            if j is None:                        # an output with no input to pair with: reused as it was
                cached.append(entry)
                continue
            stored, size, stride = entry
            x = args[j]
            if self.calibrators[m] is None:
                cached.append(torch.add(x, stored, out=_layout(size, stride, stored.dtype, x)))
                continue
            terms, coefs = stored.combination(call.step)
            out = _layout(size, stride, x.dtype, x)
            kept = self.combine[m](out, x, torch.tensor(coefs, dtype=torch.float32, device=x.device), *terms)
            if stored.keep:
                stored.kept(kept[0], call.step)
            cached.append(out)
        return tuple(cached)

    def _store(self, b: BranchState, args, outs, residuals, step: int) -> None:
        rc = b.regions.get(self.index)
        if rc is None:
            rc = b.regions[self.index] = RegionCache()
        old = rc.entries
        entries, it = [], iter(residuals)
        for m, (o, j) in enumerate(zip(outs, self.residual_of)):
            if j is None:
                entries.append(o)
                continue
            residual = next(it)
            make = self.calibrators[m]
            if make is None:
                entries.append((residual, o.size(), o.stride()))
                continue
            cal = old[m][0] if old else make()
            cal.update(residual, step)
            entries.append((cal, o.size(), o.stride()))
        rc.entries = entries
        b.has_cache = True
        if self.hidden is not None:
            j, r = self.hidden
            rc.input, rc.hidden_residual = args[j].contiguous(), residuals[r]


def _layout(size, stride, dtype, like: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the computed output's layout, on ``like``'s device."""
    return torch.empty_strided(size, stride, dtype=dtype, device=like.device)


class CachedGraph:
    """The callable the backend returns to dynamo for a graph with a block chain.

    ``pieces`` maps each segment index to its compiled callable: the gate (signals
    fused in), each region (residuals fused in) and the rest plain. ``regions``
    maps each region's index to its per-output calibrator factories and
    combination graphs (None without a calibrator).

    The gate and regions are plain callables, not modules, and the rest are the
    compiled pieces themselves, set in the split graph's ``__dict__``: a call
    goes through no ``nn.Module.__call__`` (hooks, 3-4 us each on CPU), only
    the split graph's generated ``forward``.
    """

    def __init__(self, plan: SplitPlan, pieces: list[Callable], gate_layout: GateLayout, strategy,
                 regions: dict[int, tuple[list, list]], state: ModelState,
                 timestep_inputs: dict[int, str], shape_inputs: list[int], group=None):
        self.state = state
        self.timestep_inputs, self.timestep_names = list(timestep_inputs), list(timestep_inputs.values())
        self.shape_inputs = shape_inputs
        self.timestep_choice = 0
        self.timestep_settled = len(timestep_inputs) <= 1   # settled: only the chosen input is read
        # graphs of one model cut alike (a static graph and its dynamic-shape recompile) share caches
        self.call = _Call(plan.layout(), len(plan.segments))
        self.lagged = strategy.lagged
        for k, (seg, run) in enumerate(zip(plan.segments, pieces)):
            if k == plan.gate_segment:
                mod = FnGate(run, plan.gate_hidden_in, plan.gate_hidden_out, gate_layout, self.call, strategy,
                             self._choose_timestep, plan.example_values.get(plan.gate_hidden_name), group)
            elif seg.kind == "mid":
                calibrators, combine = regions.get(k, (None, None))
                hidden = None
                if strategy.stores_inputs and seg.hidden_in is not None:
                    paired = [m for m, j in enumerate(seg.residual_of) if j is not None]
                    hidden = (seg.hidden_in, paired.index(seg.hidden_out))
                mod = Region(run, k, seg.residual_of, self.call, calibrators, combine, hidden)
                if strategy.lagged and k in strategy.layers:
                    mod.measure = strategy.measure_layer
            else:
                mod = run
            plan.parent._modules.pop(seg.module_name, None)
            plan.parent.__dict__[seg.module_name] = mod
        self.run = forward_of(plan.parent)

    def _timesteps(self, rs: RequestState, args) -> list:
        """The timestep tensors to read this call (no sync here): the chosen input once
        settled, every candidate until then, or the one an earlier graph saw."""
        if not self.timestep_inputs:
            seen, rs.observed_t = rs.observed_t, None
            if seen is None:
                return []
            rs.timestep_input = f"{seen[1]} (seen in an earlier graph)"
            return [_timestep_key(seen[0])]
        rs.timestep_input = self.timestep_names[self.timestep_choice]
        if self.timestep_settled:
            return [_timestep_key(args[self.timestep_inputs[self.timestep_choice]])]
        return [_timestep_key(args[i]) for i in self.timestep_inputs]

    def _choose_timestep(self, ts: list[float]) -> Optional[float]:
        """Of the candidates read, the one that moves within a request (a constant one is
        guidance; two requests may differ in it). Once one moves, it is the model's choice."""
        if not ts:
            return None
        if self.timestep_settled:
            return ts[0]
        rs = self.call.request
        prev = rs.timesteps_seen.get(self)
        moved = [k for k, (a, b) in enumerate(zip(ts, prev)) if a != b] if prev else []
        if moved:
            if self.timestep_choice not in moved:   # we took a constant (guidance): switch
                self.timestep_choice = moved[0]
                rs.retime(prev[moved[0]])
                rs.timestep_input = self.timestep_names[moved[0]]
            self.timestep_settled = True
        rs.timesteps_seen[self] = ts
        return ts[self.timestep_choice]

    def __call__(self, *args):
        call, state = self.call, self.state
        rs = call.request = state.current()
        call.context = state.pipeline.current() if state.pipeline is not None else None
        call.timesteps = self._timesteps(rs, args) if rs.needs_timestep(call.context) else []
        call.shape_key = tuple(tuple(args[i].shape) for i in self.shape_inputs)
        call.guess = rs.predict(call.context, call.shape_key)
        if self.lagged:   # DiTango: the rows its layers measure during this call
            call.pending = []
        out = self.run(*args)
        if self.lagged and call.pending:
            rs.pending = torch.cat(call.pending)
        if rs.last_step is not None and call.step >= rs.last_step:
            rs.end_call(call.branch)
            if rs.finished:
                state.last = rs
        return out


def _timestep_key(t: torch.Tensor) -> torch.Tensor:
    """One number per call from a timestep of any dtype and shape: its largest entry
    (Wan 2.2 TI2V passes (B, seq_len) with 0 on the conditioning frame's tokens)."""
    return t.detach().amax()
