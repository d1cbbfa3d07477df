"""Strategies: what the gate measures and which regions compute on each call.

A strategy is a typed config (``cachec.options``) and a handler here;
``STRATEGIES`` maps one to the other, as torchao's ``quantize_`` maps configs to
handlers. A handler says

* ``granularity``: how finely the plan cuts the middle into regions
  ("stretch": as few regions as the chain allows; "block": one per block);
* ``signal``: which signal the gate segment computes, fused into its compiled
  code as partial sums ("residual": the Fn residual's change; "probe": each
  block's input change, ``plan.probe_sums``);
* ``signal_inputs(branch, like)``: the stored tensors the gate compares with;
* ``decide(...)``: from the step, the branch's records and (lazily) the signals,
  which regions compute on this call.

The regions themselves (``runtime.gate.Region``) compute and store, or reuse,
the same way under every strategy. docs/design.md ("Strategies") has the rules.
"""
from __future__ import annotations

import bisect
import warnings
from typing import Callable, Optional

import torch

from ..options import (DBCacheConfig, DBPruneConfig, DiTangoConfig, FlexDBCacheConfig, PABConfig, TeaCacheConfig,
                       check_steps)
from ..plan import SplitPlan, l1_sums, probe_sums, ratio
from .calibrators import lookup
from .state import BranchState, RegionCache, RequestState

Signals = Callable[[], Optional[list]]     # the partial sums of this call, flat; None: nothing to compare


class DBCache:
    """cache-dit's DBCache: one decision per call from the Fn residual's relative L1 change."""

    granularity = "stretch"
    signal = "residual"
    stores_inputs = False
    lagged = False   # signals measured during a call and read with the next call's sync (DiTango)

    def __init__(self, config: DBCacheConfig, plan: SplitPlan, blocks: list[str], model: str = ""):
        self.config = config
        self.all = {True: [True] * len(plan.segments), False: [False] * len(plan.segments)}
        self.cooldown = getattr(config, "cooldown", 0)   # FlexCache's last steps that always compute
        self.cooldown_unknown = False                     # warned: no step count to place the cooldown

    def signal_inputs(self, branch: Optional[BranchState], like: torch.Tensor) -> tuple[list, bool]:
        prev = branch.prev_residual if branch is not None else None
        if prev is None or prev.shape != like.shape:
            return [torch.zeros(like.shape, dtype=like.dtype, device=like.device)], False
        return [prev], True

    def measure(self, branch: BranchState, hidden_out: torch.Tensor, residual: torch.Tensor) -> Optional[list]:
        """The signals against ``branch``'s own records (a call placed otherwise than predicted)."""
        prev = branch.prev_residual
        if prev is None or prev.shape != residual.shape:
            return None
        return l1_sums(prev, residual).flatten().tolist()

    def step_forced(self, request: RequestState, branch: BranchState, step: int) -> Optional[tuple[bool, str]]:
        """The rules before any diff, in cache-dit's order; None: the diff decides."""
        c = self.config
        if step in request.warmup_steps:
            return True, "warmup"
        if self.cooldown and self._in_cooldown(request, step):
            return True, "cooldown"
        if not branch.has_cache:
            return True, "nothing cached yet"
        mask = request.mask
        if mask is not None and step < len(mask):
            if mask[step]:
                return True, "steps_computation_mask"
            if c.steps_computation_policy == "static":
                return False, "steps_computation_mask (static)"
        return None

    def _in_cooldown(self, request: RequestState, step: int) -> bool:
        """Whether ``step`` is one of the generation's last ``cooldown`` steps; FlexCache's rule
        warmup + cooldown < num_inference_steps is checked against the step count in effect."""
        last = request.last_step
        if last is None:
            if not self.cooldown_unknown:
                self.cooldown_unknown = True
                from ..backend import CachecWarning
                warnings.warn(f"cachec: cooldown={self.cooldown} needs the generation's step count, which this "
                              f"pipeline does not tell: pass num_inference_steps in the options (or call "
                              f"cachec.refresh(model, num_inference_steps=N)); until then no step is a cooldown "
                              f"step", CachecWarning, stacklevel=4)
            return False
        check_steps(self.config.max_warmup_steps, self.cooldown, last + 1)
        return step > last - self.cooldown

    def decide(self, call, branch: BranchState, step: int, signals: Signals, residual) -> None:
        c, request = self.config, call.request
        forced = self.step_forced(request, branch, step)
        if forced is None:
            forced = _limits(c, len(branch.cached_steps), branch.continuous_cached, branch.accumulated_diff)
        if forced is not None:
            compute, reason = forced
        else:
            d = self._diff(request, branch, step, signals)
            if d is None:
                compute, reason = True, "no residual to compare"
            else:
                compute = d >= c.residual_diff_threshold
                reason = "diff above threshold" if compute else "diff below threshold"
        branch.record(step, compute, reason, cached_status=request.cached_status)
        if compute:
            branch.prev_residual = residual
        call.compute = self.all[compute]

    def _diff(self, request: RequestState, b: BranchState, step: int, signals: Signals) -> Optional[float]:
        """Measure (or, for a later CFG branch, maybe borrow) this step's diff and record it."""
        first = request.branches.get(request.step_first[1])
        if (first is not b and not self.config.cfg_diff_compute_separate
                and first is not None and step in first.residual_diffs):
            d = first.residual_diffs[step]
        else:
            sums = signals()
            if sums is None:
                return None
            d = ratio(sums[0], sums[1])
        b.residual_diffs[step] = d
        if d > 0:
            b.accumulated_diff += d
        return d


def _limits(c: DBCacheConfig, cached: int, continuous: int, accumulated: float) -> Optional[tuple[bool, str]]:
    """cache-dit's bounds on caching, then the threshold's two ends; None: the diff decides."""
    if 0 <= c.max_cached_steps <= cached:
        return True, "max_cached_steps"
    if 0 <= c.max_continuous_cached_steps <= continuous:
        return True, "max_continuous_cached_steps"
    if c.max_accumulated_residual_diff_threshold is not None and accumulated >= c.max_accumulated_residual_diff_threshold:
        return True, "max_accumulated_residual_diff_threshold"
    if c.residual_diff_threshold <= 0:
        return True, "threshold 0"
    if c.residual_diff_threshold >= 1:
        return False, "threshold >= 1"
    return None


class DBPrune(DBCache):
    """cache-dit's Dynamic Block Prune: each middle block decides on its own.

    Block i is skipped (its stored residual reused) when the relative L1 change
    of its input against the last step it ran is under the threshold. All
    blocks' signals come from one probe fused into the Fn segment and reach the
    host in the call's one read: the probe follows the trajectory where every
    block reuses, exact for a block while all blocks before it are skipped
    (docs/design.md, "DBPrune"). Warmup, SCM masks and "nothing cached yet" act
    on the whole step; the caching bounds and the threshold act per block.
    """

    granularity = "block"
    signal = "probe"
    stores_inputs = True

    def __init__(self, config: DBPruneConfig, plan: SplitPlan, blocks: list[str], model: str = ""):
        super().__init__(config, plan, blocks)
        chain = list(blocks)
        never = set(config.non_prune_block_ids)
        self.probe = plan.probe_regions
        # region -> its ordinal in the probe rows; regions outside the probe never prune
        self.rows = {k: i for i, k in enumerate(self.probe)
                     if not never & {chain.index(b) for b in plan.segments[k].blocks if b in chain}}
        self.blocks_total = len(chain)

    def signal_inputs(self, branch: Optional[BranchState], like: torch.Tensor) -> tuple[list, bool]:
        inputs, zeros, measurable = [], None, False
        for k in self.probe:
            rc = branch.regions.get(k) if branch is not None else None
            if rc is not None and rc.input is not None and rc.input.shape == like.shape:
                inputs += [rc.input, rc.hidden_residual]
                measurable = True
            else:
                if zeros is None:
                    zeros = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
                inputs += [zeros, zeros]
        return inputs, measurable

    def measure(self, branch: BranchState, hidden_out: torch.Tensor, residual) -> Optional[list]:
        inputs, measurable = self.signal_inputs(branch, hidden_out)
        return probe_sums(hidden_out, *inputs).flatten().tolist() if measurable else None

    def decide(self, call, branch: BranchState, step: int, signals: Signals, residual) -> None:
        c = self.config
        forced = self.step_forced(call.request, branch, step)
        compute = list(self.all[True])
        diffs: dict[int, float] = {}
        pruned = 0
        if forced is None or not forced[0]:
            sums = None
            for k, row in self.rows.items():
                rc = branch.regions.get(k)
                if rc is None or rc.input is None or not rc.entries:
                    continue
                why = forced or _limits(c, rc.cached, rc.continuous, rc.accumulated)
                if why is None:
                    if sums is None:
                        sums = signals() or []
                    if 2 * row + 1 >= len(sums):
                        continue
                    d = ratio(sums[2 * row], sums[2 * row + 1])
                    threshold = self._threshold(list(diffs.values()))
                    diffs[k] = d
                    rc.accumulated += d if d > 0 else 0.0
                    prune = d < threshold
                else:
                    prune = not why[0]
                if prune:
                    compute[k] = False
                    pruned += 1
        for k in self.rows:   # prunable blocks: their own bounds, and the summary's block map
            rc = branch.regions.get(k)
            if rc is None:
                rc = branch.regions[k] = RegionCache()
            rc.record(step, compute[k])
        reason = forced[1] if forced is not None else ("blocks pruned" if pruned else "no block under threshold")
        branch.record(step, pruned == 0, reason, cached_status="pruned")
        branch.blocks_run[step] = self.blocks_total - pruned
        if diffs:
            branch.residual_diffs[step] = sum(diffs.values()) / len(diffs)
        call.compute = compute

    def _threshold(self, earlier: list[float]) -> float:
        """cache-dit's dynamic threshold from the diffs this step measured before this block."""
        c = self.config
        t = c.residual_diff_threshold
        if not c.enable_dynamic_prune_threshold:
            return t
        first = [d for d in earlier[:5] if d > 0]
        if not first:
            return t
        relaxed = sum(first) / len(first) * c.dynamic_prune_threshold_relax_ratio
        return max(relaxed, t) if relaxed < c.max_dynamic_threshold() else t


class TeaCache(DBCache):
    """TeaCache: one decision per call, for the whole block chain, from the first block's
    timestep-modulated input.

    The gate's segment is the prologue with a copy of that input's computation
    (``passes.modulated``); it returns the input and its partial sums against the
    branch's value at the previous call. The relative L1 change, rescaled by the
    model's polynomial, adds up over the calls of a branch; while the sum stays
    under the threshold the chain reuses its residuals, once it reaches it the chain
    computes and the sum starts again from 0. Warmup, cooldown, "nothing cached
    yet" and the caching bounds force computing steps, as in DBCache.
    """

    signal = "modulated"

    def __init__(self, config: TeaCacheConfig, plan: SplitPlan, blocks: list[str], model: str = ""):
        super().__init__(config, plan, blocks)
        self.rescale = config.rescale(model)

    def poly(self, x: float) -> float:
        y = 0.0
        for c in self.rescale:
            y = y * x + c
        return y

    def decide(self, call, branch: BranchState, step: int, signals: Signals, modulated) -> None:
        c, request = self.config, call.request
        forced = self.step_forced(request, branch, step)
        sums = signals() if branch.prev_residual is not None else None
        if sums is not None:   # the change since the branch's previous call, whatever it decides
            d = ratio(sums[0], sums[1])
            branch.residual_diffs[step] = d
            branch.accumulated_diff += self.poly(d)
        if forced is None:
            # TeaCache's sum is its signal, not a bound on caching: no accumulated bound here
            forced = _limits(c, len(branch.cached_steps), branch.continuous_cached, 0.0)
        if forced is not None:
            compute, reason = forced
        elif sums is None:
            compute, reason = True, "no modulated input to compare"
        else:
            compute = branch.accumulated_diff >= c.residual_diff_threshold
            reason = "accumulated >= threshold" if compute else "accumulated < threshold"
        branch.record(step, compute, reason, cached_status=request.cached_status)
        if compute:
            branch.accumulated_diff = 0.0
        branch.prev_residual = modulated   # TeaCache compares consecutive calls, computed or not
        call.compute = self.all[compute]


class _Scheduled(DBCache):
    """A strategy whose gate measures nothing (PAB, DiTango): the gate segment only places the call."""

    signal = "none"

    def signal_inputs(self, branch: Optional[BranchState], like) -> tuple[list, bool]:
        return [], False

    def measure(self, branch: BranchState, hidden_out, residual) -> Optional[list]:
        return None


class PAB(_Scheduled):
    """Pyramid Attention Broadcast: each attention output (a region, ``passes.attention``) is
    computed once every ``self_attention_range`` steps (self and joint attention),
    ``temporal_attention_range`` (across frames) or ``cross_attention_range`` steps (cross
    attention) and reused as it was in between; a range
    under 2 computes every step. No signal: the gate only places the call. Warmup, cooldown
    and "nothing cached yet" compute every attention."""

    granularity = "attention"

    def __init__(self, config: PABConfig, plan: SplitPlan, blocks: list[str], model: str = ""):
        super().__init__(config, plan, blocks)
        every = {"cross": config.cross_attention_range, "temporal": config.temporal_attention_range}
        self.ranges = {k: every.get(plan.segments[k].attention, config.self_attention_range) for k in plan.regions()}

    def decide(self, call, branch: BranchState, step: int, signals: Signals, residual) -> None:
        forced = self.step_forced(call.request, branch, step)
        compute = list(self.all[True])
        reused = 0
        for k, every in self.ranges.items():
            rc = branch.regions.get(k)
            if rc is None:
                rc = branch.regions[k] = RegionCache()
            if (forced is None and every > 1 and rc.entries and rc.last_ran is not None
                    and step - rc.last_ran < every):
                compute[k] = False
                reused += 1
            rc.record(step, compute[k])
        reason = forced[1] if forced is not None else (
            f"{reused} of {len(self.ranges)} attention outputs broadcast" if reused else "every attention computes")
        branch.record(step, reused == 0, reason, cached_status="broadcast")
        call.compute = compute


class DiTango(_Scheduled):
    """DiTango on one device: each (layer, head group) of attention work is a region
    (``passes.attention.split_heads``), reused while its error estimate stays under the
    ``cache_ratio``-quantile of the estimates seen so far in the generation.

    **The estimate.** During a call, each layer measures on the device, per group, the
    relative L1 change of its queries since the step the group last computed (partial
    sums, one ``(groups, 2)`` tensor per layer); the branch keeps each group's queries of
    that step. The sums reach the host with the next call's one read, so a step decides
    from what the step before it measured, extrapolated one step along each group's rate:
    ``e * (n + 1) / n`` for a group reused for the last n steps, ``e / n`` for one that
    computed at the last step after n steps.

    **The decision** (made by a step's first branch, shared by its other CFG branches):
    warmup, cooldown and "nothing cached yet" compute everything; so does an **anchor**
    step, when the mean estimate passes ``0.6 * cache_ratio`` (``cache_ratio`` 0 anchors every
    step); otherwise a group reuses its output when its estimate is under the quantile.
    """

    granularity = "heads"
    lagged = True

    def __init__(self, config: DiTangoConfig, plan: SplitPlan, blocks: list[str], model: str = ""):
        super().__init__(config, plan, blocks)
        self.order = plan.regions()
        self.ratio = config.cache_ratio
        self.output_dir = config.output_dir
        # per layer: its first group's region (which measures for the layer), the query's input
        # index there, and each group's (region, first head, end head)
        self.layers: dict[int, tuple[int, list]] = {}
        leaders: dict[tuple, int] = {}
        for k in self.order:
            seg = plan.segments[k]
            query, h0, h1 = seg.heads[:3]
            lead = leaders.setdefault((seg.blocks[0], query), k)
            if lead == k:
                self.layers[k] = (seg.input_names.index(query), [])
            self.layers[lead][1].append((k, h0, h1))
        self.layer_starts = {self.order.index(k) for k in self.layers}
        self.warned_map = False

    def measure_layer(self, call, leader: int, args) -> None:
        """Before the layer's first group runs: this layer's per-group change of the queries
        since each group last computed (sums, for the next call's read), then the stored
        queries of the groups computing now."""
        q_index, groups = self.layers[leader]
        q = args[q_index]
        rc = call.branch.regions[leader]
        ref = rc.input
        if ref is None or ref.shape != q.shape or ref.dtype != q.dtype:
            rc.input = q.detach().clone(memory_format=torch.contiguous_format)
            call.pending.append(torch.zeros((len(groups), 2), dtype=torch.float32, device=q.device))
            return
        diff = (q - ref).abs().sum(dim=(0, 2, 3), dtype=torch.float32)
        base = ref.abs().sum(dim=(0, 2, 3), dtype=torch.float32)
        call.pending.append(torch.stack([diff, base], 1).view(len(groups), -1, 2).sum(1))
        for k, h0, h1 in groups:
            if call.compute[k]:
                ref[:, h0:h1].copy_(q[:, h0:h1])

    def decide(self, call, branch: BranchState, step: int, signals: Signals, residual) -> None:
        rs = call.request
        shared = rs.shared
        if shared.get("step") != step:   # the step's first branch decides for every branch
            shared["step"] = step
            shared["decision"] = self._decide_step(rs, branch, step, signals)
        want, reason = shared["decision"]
        compute = list(self.all[True])
        reused = 0
        for k in self.order:
            rc = branch.regions.get(k)
            if rc is None:
                rc = branch.regions[k] = RegionCache()
            if not want[k] and rc.entries:
                compute[k] = False
                reused += 1
            rc.record(step, compute[k])
        branch.record(step, reused == 0, reason, cached_status="reused")
        call.compute = compute

    def _decide_step(self, rs: RequestState, branch: BranchState, step: int, signals: Signals) -> tuple[dict, str]:
        sh = rs.shared
        history, recent, before = sh.setdefault("history", []), sh.setdefault("recent", {}), sh.setdefault("before", {})
        sums = signals() if step > 0 else None   # at step 0 they are the last generation's
        estimate = {}
        if sums and len(sums) == 2 * len(self.order):
            for i, k in enumerate(self.order):
                e = ratio(sums[2 * i], sums[2 * i + 1])
                if e > 0:
                    bisect.insort(history, e)
                last = recent.get(k)
                if last is None:
                    continue
                if last == step - 1:      # it computed at the last step: one step of its rate
                    n = max(1, last - before.get(k, last - 1))
                    estimate[k] = e / n
                else:
                    n = max(1, step - 1 - last)
                    estimate[k] = e * (n + 1) / n
        forced = self.step_forced(rs, branch, step)
        mean = sum(estimate.values()) / len(estimate) if estimate else 0.0
        if forced is None and self.ratio <= 0:
            forced = (True, "cache_ratio 0")
        if forced is None and (not estimate or not history):
            forced = (True, "no estimate yet")
        if forced is None and mean > 0.6 * self.ratio:
            forced = (True, f"anchor: mean estimate {mean:.3f} > 0.6 x {self.ratio:g}")
        if forced is not None and forced[0]:
            want = {k: True for k in self.order}
            reason = forced[1]
        else:
            tau = history[min(len(history) - 1, int(self.ratio * len(history)))]
            want = {k: not (k in estimate and estimate[k] < tau) for k in self.order}
            reused = sum(not w for w in want.values())
            reason = f"{reused} of {len(self.order)} head groups reused (quantile {tau:.3f})"
        for k, w in want.items():
            if w:
                before[k], recent[k] = recent.get(k, step - 1), step
        self._map(rs, step, want, forced is not None)
        return want, reason

    def _map(self, rs: RequestState, step: int, want: dict, anchor: bool) -> None:
        """Keep the step's row of the decision map; write the map at the generation's last step."""
        if self.output_dir is None:
            return
        rows = rs.shared.setdefault("map", {})
        rows[step] = ["anchor" if anchor else ("computed" if want[k] else "reused") for k in self.order]
        if rs.last_step is None:
            if not self.warned_map:
                self.warned_map = True
                from ..backend import CachecWarning
                warnings.warn(f"cachec: DiTango writes its decision map to {self.output_dir!r} at a generation's "
                              f"last step, which this pipeline does not tell: pass num_inference_steps in the "
                              f"options (or cachec.refresh(model, num_inference_steps=N))", CachecWarning,
                              stacklevel=4)
            return
        if step == rs.last_step:
            from .policy_map import write_policy_map
            full = [rows.get(s, ["anchor"] * len(self.order)) for s in range(step + 1)]
            write_policy_map(self.output_dir, full, self.layer_starts)


STRATEGIES = {DBCacheConfig: DBCache, DBPruneConfig: DBPrune, FlexDBCacheConfig: DBCache, TeaCacheConfig: TeaCache, PABConfig: PAB,
              DiTangoConfig: DiTango}


def strategy_for(config) -> type:
    """The handler class for a strategy config (``STRATEGIES``)."""
    return lookup(STRATEGIES, config, "strategy handler")


__all__ = ["DBCache", "DBPrune", "TeaCache", "PAB", "DiTango", "STRATEGIES", "strategy_for", "RegionCache"]
