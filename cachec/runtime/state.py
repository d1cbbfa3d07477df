"""Step, generation and CFG-branch bookkeeping for one compiled model.

Nothing here is global: a ``ModelState`` belongs to one ``torch.compile`` call
and is shared by the graphs dynamo hands that call's backend.

Every call lands in a (generation, step, branch):

- **Named calls.** Where the pipeline wraps the call in
  ``transformer.cache_context(name, **fields)`` (``runtime.context``), the name
  is the branch: "cond" and "uncond" never merge or swap. With ``step_index``
  that number is the step, and a step index that does not move past the
  branch's last one starts a new generation. Without it, each call of a branch
  is its next step, and a generation ends when the branch has made
  ``num_inference_steps`` calls or its timestep moves against the direction it
  took.
- **Unnamed calls.** The branch is the call's position within its step. A
  call belongs to the step before it when its timestep equals that step's and
  the step has not had as many calls as the first step of the generation had
  (so two steps whose timesteps round to one bf16 value stay two steps once
  the pattern is known). A generation ends after ``num_inference_steps``
  steps, when the timestep moves against the direction the generation took at
  its first change, and when a step's first call has new input shapes.

In both, ``cachec.refresh`` starts a new generation, and a branch whose input
shapes change starts afresh: residuals of another shape are never reused.

**Requests.** All of the above lives in a ``RequestState``: one per thread by
default, one per key inside ``cachec.request(model, key)``. The ``ModelState``
of a compiled model holds what its requests share (the chain found, warnings
given, the pipeline's context recorder) and hands each call the request state
of the thread it runs in, so concurrent or interleaved generations never see
each other's residuals (docs/design.md, "Requests"). Where a generation's step
count is known, a branch's activation-sized buffers are freed after its last
call; its records (the summary) stay.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterator, Optional

import torch

from ..options import DBCacheConfig
from .context import CallContext


@dataclass
class RegionCache:
    """What one region (a stretch of blocks, or one block) of one branch keeps."""

    entries: list = field(default_factory=list)     # per output: (residual or calibrator, size, stride), or a value
    input: Optional[torch.Tensor] = None            # per-block strategies: hidden input when it last ran
    hidden_residual: Optional[torch.Tensor] = None  # ... and the hidden residual it stored then
    cached: int = 0                                 # per-block strategies: steps skipped in this generation
    continuous: int = 0
    accumulated: float = 0.0
    ran: dict = field(default_factory=dict)         # step -> ran? (the summary's block map)
    last_ran: Optional[int] = None                  # PAB: the last step it computed

    def release(self) -> None:
        """Drop the activation-sized buffers; the block map stays."""
        self.entries, self.input, self.hidden_residual = [], None, None

    def record(self, step: int, computed: bool) -> None:
        self.ran[step] = computed
        if computed:
            self.last_ran = step
            self.continuous = 0
        else:
            self.cached += 1
            self.continuous += 1


@dataclass
class BranchState:
    """The cache of one CFG branch (cond, uncond, ...) in one generation."""

    key: Hashable = 0                               # the pipeline's name, or the position in the step
    shape_key: tuple = ()
    prev_residual: Optional[torch.Tensor] = None    # Fn residual at the last computed step
    regions: dict = field(default_factory=dict)     # segment index -> RegionCache
    has_cache: bool = False
    plan: tuple = ()                                # the segment layout ``regions`` was stored for
    continuous_cached: int = 0
    accumulated_diff: float = 0.0
    computed_steps: list = field(default_factory=list)
    cached_steps: list = field(default_factory=list)
    residual_diffs: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)     # step -> why it computed or cached
    status: dict = field(default_factory=dict)      # step -> "computed", "cached", "extrapolated" or "pruned"
    blocks_run: dict = field(default_factory=dict)  # per-block strategies: step -> chain blocks that ran
    # named calls: where this branch's own sequence of calls stands
    calls: int = 0
    last_step_index: Optional[int] = None
    last_t: Optional[float] = None
    direction: int = 0

    def release(self) -> None:
        """Drop the activation-sized buffers (the generation's end); the records stay."""
        self.prev_residual, self.has_cache = None, False
        for rc in self.regions.values():
            rc.release()

    def record(self, step: int, computed: bool, reason: str, cached_status: str) -> None:
        self.reasons[step] = reason
        self.status[step] = "computed" if computed else cached_status
        if computed:
            self.continuous_cached = 0
            self.computed_steps.append(step)
        else:
            self.continuous_cached += 1
            self.cached_steps.append(step)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


class RequestState:
    """Counts one request's transformer calls into generations, steps and branches
    (module docstring)."""

    def __init__(self, config: Optional[DBCacheConfig], key: Hashable = None):
        self.config, self.key = config, key
        self.calls = 0
        self.num_inference_steps = None
        if config is None:   # opened before the model compiled: ModelState.adopt fills it in
            return
        self.num_inference_steps = config.num_inference_steps
        self.cached_status = "extrapolated" if config.calibrator() is not None else "cached"
        self.generation = -1
        self.identity = "no call yet"               # where the last call's step and branch came from
        self.timestep_input: Optional[str] = None   # the input its steps are read from, as last seen
        self.observed_t = None   # (timestep tensor, input name) from a plain graph earlier in the call
        self.timesteps_seen: dict = {}   # graph -> the timestep candidates it read last (which one moves)
        self._refresh = False
        self.follows: dict[int, int] = {}   # position in a step -> the position of the call after it, last seen
        self._start()

    def _start(self) -> None:
        self.generation += 1
        self.mask = self.config.steps_mask_for(self.num_inference_steps)   # SCM, for this step count
        self.warmup_steps = self.config.warmup_steps(self.num_inference_steps)
        self.branches: dict[Hashable, BranchState] = {}
        self.mode: Optional[str] = None              # "named" or "positional"
        self.calls = 0
        self.steps = 0                               # steps seen in this generation
        self.step_first: Optional[tuple] = None       # (step, key of the branch that ran first in it)
        # positional calls
        self.step = 0
        self.call_in_step = 0
        self.direction = 0
        self.last_t: Optional[float] = None
        self.step_t: Optional[float] = None
        sep = self.config.enable_separate_cfg
        self.pattern: Optional[int] = None if sep is None else (2 if sep else 1)   # calls per step
        # named calls
        self.first_step_index: Optional[int] = None
        self.last_step: Optional[int] = None         # the generation's last step, where its step count is known
        self.shared: dict = {}                        # a strategy's state shared by the branches (DiTango)
        self.pending: Optional[torch.Tensor] = None   # signals measured during the last call, read with the next
        self.finished = False                        # every branch made its last call: buffers freed

    def end_call(self, branch: BranchState) -> None:
        """After a call on the generation's last step: free the branch's buffers (its
        next call starts a new generation) and, once every branch is there, finish."""
        branch.release()
        self.finished = all(self.last_step in b.reasons for b in self.branches.values())

    def release(self) -> None:
        for b in self.branches.values():
            b.release()

    def refresh(self, num_inference_steps: Optional[int] = None) -> None:
        if num_inference_steps is not None:
            # validated by the config's own rules
            replace(self.config or DBCacheConfig(), num_inference_steps=num_inference_steps)
            self.num_inference_steps = num_inference_steps
        self._refresh = True

    # -- before the call's one host sync -------------------------------------------------

    def needs_timestep(self, context: Optional[CallContext]) -> bool:
        """Whether placing this call needs the timestep's value (a step index does not)."""
        return context is None or context.step_index is None

    def predict(self, context: Optional[CallContext], shape_key: tuple) -> Optional[BranchState]:
        """The branch this call most likely continues, before its timestep is read: its
        stored residual is what the gate measures against. None: nothing to measure."""
        if self._refresh or not self.calls:
            return None
        if context is not None:
            branch = self.branches.get(context.name)
        else:
            nxt = self.follows.get(self.call_in_step)   # what came after this position last time
            if nxt is None:
                nxt = self.call_in_step + 1
                if self.pattern is not None and nxt >= self.pattern:
                    nxt = 0
            # before the pattern is known a new position has no residual yet: the next step's first does
            branch = self.branches.get(nxt) or self.branches.get(0)
        return branch if branch is not None and branch.shape_key == shape_key else None

    # -- after it ------------------------------------------------------------------------

    def begin_call(self, context: Optional[CallContext], t: Optional[float],
                   shape_key: tuple) -> tuple[int, BranchState]:
        """Place one call: return (step, branch state), starting generations as needed."""
        if context is not None:
            step, branch = self._named(context, t, shape_key)
        else:
            step, branch = self._positional(t, shape_key)
        if self.step_first is None or self.step_first[0] != step:
            self.step_first = (step, branch.key)
        self.calls += 1
        self.steps = max(self.steps, step + 1)
        return step, branch

    def _begin_generation(self, mode: str) -> None:
        if self.calls:
            self._start()
        self._refresh = False
        self.mode = mode
        self.mask = self.config.steps_mask_for(self.num_inference_steps)
        self.warmup_steps = self.config.warmup_steps(self.num_inference_steps)

    def _named(self, context: CallContext, t: Optional[float], shape_key: tuple) -> tuple[int, BranchState]:
        branch = self.branches.get(context.name)
        new = self._refresh or not self.calls or self.mode != "named"
        if not new and branch is not None:
            if context.step_index is not None:
                new = branch.last_step_index is not None and context.step_index <= branch.last_step_index
            else:
                n = context.num_inference_steps or self.num_inference_steps
                moved = 0 if t is None or branch.last_t is None else _sign(t - branch.last_t)
                new = (n is not None and branch.calls >= n) or (branch.direction != 0 and moved == -branch.direction)
            new = new or branch.shape_key != shape_key   # a new resolution
        if new:
            self._begin_generation("named")
            branch = None
        if branch is None:
            branch = self.branches[context.name] = BranchState(context.name, shape_key)
        if context.step_index is not None:
            if self.first_step_index is None:
                self.first_step_index = context.step_index
            step = max(context.step_index - self.first_step_index, 0)
            self.identity = "pipeline's cache_context: branch names and step_index" + (
                f" (step 0 is the pipeline's step {self.first_step_index})" if self.first_step_index else "")
        else:
            step = branch.calls
            if t is not None and branch.last_t is not None and not branch.direction:
                branch.direction = _sign(t - branch.last_t)
            self.identity = "pipeline's cache_context: branch names; steps counted per branch"
        n = context.num_inference_steps or self.num_inference_steps
        self.last_step = None if n is None else (n - 1 if context.step_index is None
                                                 else n - 1 - (self.first_step_index or 0))
        branch.calls += 1
        branch.last_step_index, branch.last_t = context.step_index, t
        return step, branch

    def _same_step(self, t: Optional[float]) -> bool:
        if self.pattern is not None and self.call_in_step + 1 >= self.pattern:
            return False
        if self.config.enable_separate_cfg:
            return True
        return t is not None and t == self.step_t

    def _positional(self, t: Optional[float], shape_key: tuple) -> tuple[int, BranchState]:
        before = self.call_in_step
        if self._refresh or not self.calls or self.mode != "positional":
            self._begin_generation("positional")
            self.step_t = t
        elif self._same_step(t):
            self.call_in_step += 1
        else:
            n = self.num_inference_steps
            moved = 0 if (t is None or self.last_t is None) else _sign(t - self.last_t)
            if (n is not None and self.step + 1 >= n) or (self.direction and moved == -self.direction):
                self._begin_generation("positional")
            else:
                self.direction = self.direction or moved
                if self.pattern is None:   # the first step is over: it says how many calls a step has
                    self.pattern = self.call_in_step + 1
                self.step += 1
                self.call_in_step = 0
            self.step_t = t
        branch = self.branches.get(self.call_in_step)
        if branch is not None and branch.shape_key != shape_key:
            if self.call_in_step == 0 and self.step > 0:
                self._begin_generation("positional")   # a new shape on a step's first call: a new generation
                self.step_t = t
            self.branches.pop(self.call_in_step, None)
            branch = None
        if branch is None:
            branch = self.branches[self.call_in_step] = BranchState(self.call_in_step, shape_key)
        self.last_t = t
        self.last_step = None if self.num_inference_steps is None else self.num_inference_steps - 1
        self.follows[before] = self.call_in_step
        self.identity = (f"timestep input '{self.timestep_input}'; branch = call's place in its step"
                         if t is not None else "call count (no timestep input found)")
        return self.step, branch

    def retime(self, value: float) -> None:
        """The timestep input turned out to be another one, constant until now at ``value``."""
        self.last_t = self.step_t = value
        for b in self.branches.values():
            if b.last_t is not None:
                b.last_t = value

    def branch_name(self, key: Hashable) -> str:
        if isinstance(key, str):
            return key
        if len(self.branches) == 1:   # positional keys are 0..k: one call per step
            return "all"
        first, second = ("uncond", "cond") if self.config.cfg_compute_first else ("cond", "uncond")
        return {0: first, 1: second}.get(key, f"call{key}")

    def steps_done(self) -> int:
        return self.steps


class ModelState:
    """What the requests of one compiled model share, and the request each call belongs to.

    ``current()`` is the request state of the calling thread: the one its
    ``request(key)`` scope names, or else the thread's own. A thread's own state
    lives in a ``threading.local`` and goes with the thread; a keyed one lives
    until its generation finishes and another key is opened, or ``release(key)``.
    """

    def __init__(self, config: Optional[DBCacheConfig]):
        self.config = config
        self.chain_info: dict = {}
        self.warned: set[str] = set()
        self.first_plain_graph = None   # the first graph without a chain that ran
        self.graph_breaks: list[str] = []   # why dynamo split this model's forward, as it said
        self.pipeline = None     # runtime.context.PipelineContext of the compiled module, if it has one
        self.last: Optional[RequestState] = None   # the last request whose generation finished or was released
        self._local = threading.local()
        self._lock = threading.Lock()
        self._threads: "weakref.WeakKeyDictionary[threading.Thread, RequestState]" = weakref.WeakKeyDictionary()
        self.requests: dict[Hashable, RequestState] = {}

    def adopt(self, config: DBCacheConfig) -> None:
        """The config of the first compile, for a state ``cachec.request`` opened before it."""
        self.config = config
        for rs in self.states():
            if rs.config is None:
                steps = rs.num_inference_steps   # a refresh before the first call
                rs.__init__(config, rs.key)
                if steps is not None:
                    rs.refresh(steps)

    def current(self) -> RequestState:
        """The calling thread's request state (hot path: one thread-local read)."""
        try:
            return self._local.state
        except AttributeError:
            return self._own()

    def _own(self) -> RequestState:
        rs = RequestState(self.config)
        self._local.state = rs
        with self._lock:
            self._threads[threading.current_thread()] = rs
        return rs

    @contextlib.contextmanager
    def request(self, key: Hashable) -> Iterator[RequestState]:
        with self._lock:
            rs = self.requests.get(key)
            if rs is None:
                # finished requests go when another one opens: their summary stays readable until then
                for k in [k for k, r in self.requests.items() if r.finished]:
                    del self.requests[k]
                rs = self.requests[key] = RequestState(self.config, key)
        outer = getattr(self._local, "state", None)
        self._local.state = rs
        try:
            yield rs
        finally:
            if outer is None:
                del self._local.state
            else:
                self._local.state = outer

    def states(self) -> list[RequestState]:
        """Every live request state: the threads' own and the keyed ones."""
        with self._lock:
            return list(self._threads.values()) + list(self.requests.values())

    def release(self, key: Hashable = None) -> None:
        """Free activation-sized buffers: of request ``key`` (then forget it), or of every
        request. Records stay, so the summary survives."""
        if key is not None:
            with self._lock:
                rs = self.requests.pop(key, None)
            if rs is None:
                raise KeyError(f"cachec.release: no open request {key!r}; open ones: {sorted(map(repr, self.requests))}")
            rs.release()
            self.last = rs
            return
        for rs in self.states():
            rs.release()

    def summary_state(self, key: Hashable = None) -> RequestState:
        """The request a summary describes: ``key``'s, or the calling thread's if it has made
        calls, else the last one that finished."""
        if key is not None:
            with self._lock:
                rs = self.requests.get(key)
            if rs is None:
                if self.last is not None and self.last.key == key:
                    return self.last
                raise KeyError(f"cachec.summary: no request {key!r}; open ones: {sorted(map(repr, self.requests))}")
            return rs
        rs = getattr(self._local, "state", None)
        if rs is not None and rs.calls:
            return rs
        return self.last if self.last is not None else (rs or self.current())
