"""What was computed and cached in the last generation, and why."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .state import ModelState, RequestState


@dataclass
class BranchSummary:
    computed_steps: list[int]
    cached_steps: list[int]
    residual_diffs: dict[int, float]
    reasons: dict[int, str]
    # step -> "computed", "cached" (residual reused), "extrapolated" (a calibrator
    # predicted it) or "pruned" (DBPrune: some blocks skipped)
    status: dict[int, str] = field(default_factory=dict)
    blocks_run: dict[int, int] = field(default_factory=dict)       # DBPrune: step -> chain blocks that ran
    block_map: dict[str, dict[int, bool]] = field(default_factory=dict)   # DBPrune, PAB: region -> step -> ran?


@dataclass
class CacheSummary:
    """Returned by ``cachec.summary``. Step lists are 0-based step indices.

    ``steps`` counts the denoising steps of the last generation and ``calls`` the
    transformer calls (twice as many with separate CFG). The top-level step
    lists are those of the first branch (cond, or the only one); ``branches``
    has every branch by name.
    """

    blocks: list[str]
    Fn: int
    Bn: int
    steps: int
    calls: int
    computed_steps: list[int]
    cached_steps: list[int]
    residual_diffs: dict[int, float]
    branches: dict[str, BranchSummary] = field(default_factory=dict)
    timestep_input: Optional[str] = None
    generation: int = 0
    segments: list[tuple[str, list[str]]] = field(default_factory=list)   # (kind, block names)
    config: str = ""
    identity: str = ""                     # where each call's step and branch came from
    unpaired: list[str] = field(default_factory=list)   # middle outputs reused as values (no input to pair)
    unproven: dict[str, list[str]] = field(default_factory=dict)   # blocks run always: outputs of unproven role
    strategy: str = "DBCache"
    blocks_total: int = 0                  # chain length (DBPrune's blocks_run counts out of it)
    # (blocks, subgraphs): with inductor and share_blocks, the blocks compiled as calls of that
    # many shared subgraphs (counted per compiled piece); (0, 0) where none were
    shared_blocks: tuple[int, int] = (0, 0)
    # TeaCache: the node the gate measures (block 0's modulated input, copied before the chain)
    gate_input: Optional[str] = None
    # Ulysses (passes.ulysses.UlyssesInfo): ranks, communication, what was sharded and gathered
    ulysses: Optional[object] = None

    def __str__(self) -> str:
        lines = [f"cachec: {len(self.blocks)} chained blocks, Fn={self.Fn} Bn={self.Bn} ({self.config}); "
                 f"timestep input: {self.timestep_input or 'none found (steps counted by calls)'}",
                 "segments: " + " | ".join(f"{k}[{len(b)}]" if b else k for k, b in self.segments)
                 + (f"; identical blocks compiled once: {self.shared_blocks[0]} blocks as "
                    f"{self.shared_blocks[1]} compiled subgraphs" if self.shared_blocks[1] else ""),
                 f"generation {self.generation}: {self.steps} steps, {self.calls} calls; steps and branches "
                 f"from: {self.identity}"]
        if self.ulysses is not None:
            u = self.ulysses
            lines.append(f"ulysses: rank {u.rank} of {u.world}, {u.comm} all-to-all; sharded {', '.join(u.sharded)}; "
                         f"{u.attention} attention calls ({u.cross_attention} with whole keys/values); the gate's "
                         f"sums are all-reduced" + (f"; read gathered: {', '.join(u.gathered)}" if u.gathered else ""))
        if self.gate_input:
            lines.append(f"gate measures: {self.gate_input}, computed before the chain (the diff column is its "
                         f"relative L1 change since the branch's previous call)")
        if self.unpaired:
            lines.append("reused as values on cached steps (no input to pair with): " + ", ".join(self.unpaired))
        for block, outs in self.unproven.items():
            lines.append(f"always runs: {block} (role of {', '.join(outs)} not proven by data flow)")
        if not self.branches:
            return "\n".join(lines + ["no call yet"])
        for name, b in self.branches.items():
            total = len(b.computed_steps) + len(b.cached_steps)
            counts = {k: list(b.status.values()).count(k) for k in ("cached", "extrapolated", "pruned", "broadcast")}
            line = f"  {name}: computed {len(b.computed_steps)}/{total}" + "".join(
                f", {k} {v}" for k, v in counts.items() if v)
            if b.blocks_run:
                ran = sum(b.blocks_run.values())
                line += f"; blocks run {ran}/{self.blocks_total * len(b.blocks_run)}"
            lines.append(line)
        names = list(self.branches)
        width = 52
        lines.append("step  " + "  ".join(f"{n:<{width}}" for n in names))
        for s in range(self.steps):
            cells = []
            for n in names:
                b = self.branches[n]
                if s not in b.reasons:
                    cells.append(f"{'-':<{width}}")
                    continue
                what = b.status.get(s, "cached" if s in b.cached_steps else "computed")
                if s in b.blocks_run:
                    what += f" {b.blocks_run[s]}/{self.blocks_total}"
                d = b.residual_diffs.get(s)
                diff = f"{d:.4f}" if d is not None else "  -   "
                cells.append(f"{what:<18} {diff:>7}  {b.reasons[s]}".ljust(width))
            lines.append(f"{s:>4}  " + "  ".join(cells))
        for n in names:
            lines += _block_map(n, self.branches[n].block_map, self.steps)
        return "\n".join(lines)


def _block_map(branch: str, block_map: dict[str, dict[int, bool]], steps: int) -> list[str]:
    """Per-region strategies: one row per block (DBPrune) or attention output (PAB), one column
    per step ('#' ran, '.' reused)."""
    if not block_map:
        return []
    width = max(len(b) for b in block_map)
    lines = [f"regions x steps ({branch}): '#' ran, '.' reused (pruned, broadcast), ' ' not called",
             " " * (width + 2) + "".join(str(s % 10) for s in range(steps))]
    for block, ran in block_map.items():
        lines.append(f"{block:<{width}}  " + "".join(
            " " if s not in ran else ("#" if ran[s] else ".") for s in range(steps)))
    return lines


def summarize(model: ModelState, state: RequestState) -> CacheSummary:
    """The summary of ``state``'s last generation (a request of ``model``)."""
    info = model.chain_info
    names = info.get("regions", {})
    branches = {
        state.branch_name(i): BranchSummary(
            list(b.computed_steps), list(b.cached_steps), dict(b.residual_diffs), dict(b.reasons), dict(b.status),
            dict(b.blocks_run),
            {names[k]: dict(rc.ran) for k, rc in sorted(b.regions.items()) if rc.ran and k in names})
        for i, b in state.branches.items()}
    first = next(iter(branches.values()), BranchSummary([], [], {}, {}))
    return CacheSummary(
        blocks=list(info.get("blocks", [])), Fn=state.config.Fn_compute_blocks, Bn=state.config.Bn_compute_blocks,
        steps=state.steps_done(), calls=state.calls, computed_steps=first.computed_steps,
        cached_steps=first.cached_steps, residual_diffs=first.residual_diffs, branches=branches,
        timestep_input=state.timestep_input, generation=state.generation,
        segments=list(info.get("segments", [])), config=state.config.short_name(), identity=state.identity,
        unpaired=list(info.get("unpaired", [])), unproven=dict(info.get("unproven", {})),
        strategy=state.config.cache_type, blocks_total=len(info.get("blocks", [])),
        shared_blocks=tuple(info.get("shared", (0, 0))), gate_input=info.get("gate_input"),
        ulysses=info.get("ulysses"))
