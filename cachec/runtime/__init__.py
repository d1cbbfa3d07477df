"""Run-time side of cachec: the gate, step/CFG bookkeeping, policies, summary."""
from .gate import CachedGraph
from .policy import DBCachePolicy
from .state import BranchState, ModelState
from .summary import CacheSummary, summarize

__all__ = ["CachedGraph", "DBCachePolicy", "BranchState", "ModelState", "CacheSummary", "summarize"]
