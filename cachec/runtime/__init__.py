"""Run-time side of cachec: the gate, regions, strategies, calibrators, step/CFG bookkeeping, summary.

Nothing here imports ``cachec.passes``: the plan and the positional conventions
of the compiled pieces come from ``cachec.plan``.
"""
from .calibrators import CALIBRATORS, calibrator_for
from .gate import CachedGraph
from .state import BranchState, ModelState, RegionCache, RequestState
from .strategies import STRATEGIES, strategy_for
from .summary import CacheSummary, summarize

__all__ = ["CachedGraph", "BranchState", "ModelState", "RequestState", "RegionCache", "CacheSummary", "summarize",
           "STRATEGIES", "strategy_for", "CALIBRATORS", "calibrator_for"]
