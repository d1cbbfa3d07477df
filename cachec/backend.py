"""The dynamo entry point: options -> passes -> runtime.

``torch.compile(model, backend="cachec", options={...})`` resolves through the
``torch_dynamo_backends`` entry point to ``cachec_backend``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import sys
import warnings
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
import torch.fx as fx
from torch._dynamo.backends.registry import lookup_backend
from torch._guards import TracingContext, detect_fake_mode, tracing

from .compile_configs import is_enabled, log_disabled_once, set_compile_configs, watch_recompile_limit
from .options import BackendOptions, parse_options
from .passes import NoBlockChain, find_block_chain, find_block_loops, find_graph_inputs, plan_graph
from .passes.ulysses import shard_graph
from .passes.calibrate import combination_graph
from .passes.residuals import fuse_gate_signals, fuse_residuals
from .passes.inputs import reads_back, static_tensor
from .passes.share import no_subgraph_input_asserts, share_blocks
from .plan import GateLayout, SplitPlan, forward_of
from .runtime import CachedGraph, ModelState, calibrator_for, strategy_for, summarize
from .runtime.context import PipelineContext
from .runtime.summary import CacheSummary

_STATE_ATTR = "_cachec_state"
_MANY_REQUESTS = 256   # open requests past which cachec.request warns that none of them ends


class CachecWarning(UserWarning):
    """cachec could not cache part of the model and compiled it plainly."""


def _compile_wrapper():
    """The ``_TorchCompileWrapper`` that ``torch.compile`` made for this call, if any."""
    f = sys._getframe(2)
    while f is not None:
        owner = f.f_locals.get("self")
        if isinstance(owner, torch._TorchCompileWrapper):
            return owner
        f = f.f_back
    return None


def _tracing_frame():
    """dynamo's translator for the frame whose graph we are handed (None outside dynamo)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    try:
        return InstructionTranslator.current_tx()
    except (AttributeError, IndexError):
        return None


def _traced_module() -> Optional[torch.nn.Module]:
    """The module whose forward dynamo is tracing, if it is one."""
    tx = _tracing_frame()
    mod = tx.f_locals.get("self") if tx is not None else None
    return mod if isinstance(mod, torch.nn.Module) else None


def _graph_break_reason() -> Optional[str]:
    """Why dynamo ended the graph it hands us now, if a graph break ended it."""
    tx = _tracing_frame()
    reason = getattr(getattr(tx, "output", None), "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    lines = [ln.strip() for ln in str(reason.reason).splitlines() if ln.strip()]
    ctx = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Developer debug context:")), "")
    text = (lines[0] if lines else "graph break") + (f" ({ctx})" if ctx else "")
    if reason.user_stack:
        frame = reason.user_stack[-1]
        text += f" at {frame.filename}:{frame.lineno}"
    return text


def _model_state(opts: BackendOptions, module: Optional[torch.nn.Module]) -> ModelState:
    """One state per torch.compile call, shared by the graphs of that call's model."""
    holder = _compile_wrapper() or module
    state = getattr(holder, "__dict__", {}).get(_STATE_ATTR) if holder is not None else None
    if state is not None and state.config is None:   # opened by cachec.request before the first call
        state.adopt(opts.cache_config)
    if state is None or state.config != opts.cache_config:
        state = ModelState(opts.cache_config)
        if holder is not None:
            holder.__dict__[_STATE_ATTR] = state
    if module is not None:
        module.__dict__[_STATE_ATTR] = state   # so cachec.summary(original module) finds it
        state.pipeline = state.pipeline or PipelineContext.install(module)
        watch_recompile_limit(state, module, CachecWarning)
    return state


def _region_label(seg) -> str:
    """How the summary names a region: its blocks, the attention it holds, or its heads."""
    label = "+".join(seg.blocks)
    if seg.heads is not None:
        return f"{label} attention {seg.heads[4]} heads {seg.heads[1]}-{seg.heads[2] - 1}"
    return f"{label} {seg.attention}-attention" if seg.attention else label


def _check_whole(chain, module: Optional[torch.nn.Module]) -> None:
    if module is None:
        return
    for lp in chain.loops:
        try:
            container = module.get_submodule(lp.container)
        except AttributeError:
            continue
        same = [i for i, m in enumerate(container) if type(m) is lp.cls]
        have = [b.index for b in lp.blocks]
        if have != same:
            raise NoBlockChain(f"this graph holds blocks {have[0]}-{have[-1]} of the {len(same)} "
                               f"{lp.cls.__name__} blocks in '{lp.container}': the loop is split across graphs")


def _inner_compiler(opts: BackendOptions, fake_mode, shared_count: Optional[list] = None
                    ) -> Callable[[fx.GraphModule, list], Callable]:
    """How each piece compiles: the inner backend, with ``opts.inductor``'s config patches
    (the same for every segment, gate, region and combination graph). With inductor and
    ``share_blocks``, blocks of equal structure in a piece compile once (``passes.share``);
    ``shared_count`` then adds up [blocks outlined, subgraphs compiled]."""
    inner = None if opts.inner_backend == "eager" else lookup_backend(opts.inner_backend)
    patches = _inductor_patches(opts)
    share = opts.share_blocks and opts.inner_backend == "inductor"

    def run_inner(gm: fx.GraphModule, example_inputs: list, shared: bool) -> Callable:
        # a fresh tracing context per graph: inductor records per-graph metadata there
        with tracing(TracingContext(fake_mode)), (no_subgraph_input_asserts() if shared
                                                   else contextlib.nullcontext()):
            if patches:
                return inner(gm, example_inputs, config_patches=patches)
            return inner(gm, example_inputs)

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
        if inner is None:
            return forward_of(gm)   # not gm: no nn.Module.__call__ per piece
        if share:
            outlined = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            blocks, distinct = share_blocks(outlined)
            if distinct:
                try:
                    compiled = run_inner(outlined, example_inputs, True)
                except Exception as e:   # compiled inline below: slower to compile, same result
                    warnings.warn(f"cachec: compiling identical blocks once failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); this segment's blocks compile "
                                  f"inline. share_blocks=False skips the attempt.", CachecWarning, stacklevel=2)
                else:
                    if shared_count is not None:
                        shared_count[0] += blocks
                        shared_count[1] += distinct
                    return compiled
        return run_inner(gm, example_inputs, False)
    return compile_graph


def _fake_like(value, fake_mode, contiguous: bool = False, dtype=None):
    with fake_mode:
        if contiguous:
            return torch.empty(value.shape, dtype=dtype or value.dtype, device=value.device)
        return torch.empty_strided(value.shape, value.stride(), dtype=dtype or value.dtype, device=value.device)


def _gate_graph(compile_graph: Callable, plan: SplitPlan, strategy, fake_mode) -> tuple[Callable, GateLayout]:
    """The Fn segment compiled with the strategy's signal fused in (``passes.residuals``;
    the measurements that chose fusing: bench/results/fusion_cpu.md)."""
    seg = plan.segments[plan.gate_segment]
    signal = strategy.signal
    if signal == "modulated" and not static_tensor(plan.example_values[plan.gate_hidden_name]):
        signal = "snapshot"   # symbolic shape: the gate compares after the segment runs (GateLayout.eager_sums)
    gm = fuse_gate_signals(plan.submodule(seg), plan.gate_hidden_name, plan.gate_hidden_out, signal,
                           len(plan.probe_regions))
    if signal in ("none", "snapshot"):
        extra = []
    elif strategy.signal != "probe":   # the gate hands it a contiguous residual (modulated input)
        extra = [_fake_like(plan.example_values[plan.gate_hidden_name], fake_mode, True)]
    else:                               # stored inputs and residuals, contiguous, per probed block
        extra = []
        for k in plan.probe_regions:
            r = plan.segments[k]
            hidden = _fake_like(plan.example_values[r.input_names[r.hidden_in]], fake_mode, True)
            extra += [hidden, hidden]
    layout = GateLayout(len(seg.output_names), signal in ("residual", "modulated", "snapshot"), signal == "snapshot")
    return compile_graph(gm, plan.example_inputs(seg) + extra), layout


def _region_calibrators(compile_graph: Callable, plan: SplitPlan, calibrator, fake_mode) -> dict[int, tuple]:
    """For each region, per output: a calibrator factory and its compiled combination
    graph (``passes.calibrate``), or None where the output is reused as it was.
    Outputs laid out alike share one compiled graph."""
    cls = calibrator_for(calibrator)
    n_terms = cls.terms(calibrator)
    compiled: dict[tuple, Callable] = {}
    regions = {}
    for k in plan.regions():
        seg = plan.segments[k]
        makers, graphs = [], []
        for m, (name, j) in enumerate(zip(seg.output_names, seg.residual_of)):
            wanted = calibrator.enable_calibrator if (seg.hidden_out is None or m == seg.hidden_out) \
                else calibrator.enable_encoder_calibrator
            if j is None or not wanted:
                makers.append(None)
                graphs.append(None)
                continue
            out, base = plan.example_values[name], plan.example_values[seg.input_names[j]]
            key = (tuple(out.shape), out.stride(), out.dtype, tuple(base.shape), base.stride(), base.dtype)
            if key not in compiled:
                term = _fake_like(out, fake_mode, True, torch.float32)
                with fake_mode:
                    coefs = torch.empty(n_terms, dtype=torch.float32, device=out.device)
                example = [_fake_like(out, fake_mode), base, coefs]
                compiled[key] = compile_graph(combination_graph(n_terms, cls.keep),
                                              example + [term] * n_terms)
            makers.append(functools.partial(cls, calibrator))
            graphs.append(compiled[key])
        regions[k] = (makers, graphs)
    return regions


def _plain_graph(plain: Callable, gm: fx.GraphModule, state: ModelState, why: str, inner: str) -> Callable:
    """Run a graph without a chain: warn once per model unless another of its graphs
    holds the chain, and report the timestep if it is here.

    The warning waits until the first plain graph runs again (a new forward):
    by then every graph of the forward has compiled, so the graph breaks are
    known and so is whether another graph holds the chain. After a break
    the blocks may sit in a graph whose inputs no longer include the timestep
    (an earlier graph embedded it); this graph then passes it on.
    """
    inputs = find_graph_inputs(gm)
    t_index = inputs.timestep_candidates[0] if inputs.timestep_candidates else None
    t_name = inputs.name(t_index) if t_index is not None else ""

    def run(*args):
        first = state.first_plain_graph
        if first is None:
            state.first_plain_graph = run
        if "plain" not in state.warned and not state.chain_info and first is run:
            state.warned.add("plain")
            warnings.warn(_plain_message(why, inner, state.graph_breaks[:3]), CachecWarning, stacklevel=2)
        if t_index is not None:   # read later, in the chained graph's one sync
            state.current().observed_t = (args[t_index], t_name)
        return plain(*args)
    return run


def _plain_message(why: str, inner: str, breaks: list[str]) -> str:
    msg = f"cachec: no cacheable block chain in this graph ({why}); compiled plainly with '{inner}', without caching."
    if breaks:
        msg += (f" Dynamo split the model into several graphs; the graph breaks it reported: {'; '.join(breaks)}."
                f" To keep the blocks in one graph: compile with fullgraph=True to see the break as an error;"
                f" a 'Dynamic shape operator' break (torch.nonzero) goes away with"
                f" torch._dynamo.config.capture_dynamic_output_shape_ops = True set before the first call;"
                f" a break on .numpy()/.cpu()/.tolist() or data-dependent Python needs a change to the model code.")
    return msg


def _specialize_float_inputs(gm: fx.GraphModule) -> None:
    """Make dynamo trace again with the Python floats it turned into inputs as constants.

    With ``dynamic=True`` dynamo passes Python floats (norm eps, RoPE theta) as 0-d
    float64 inputs read back with ``.item()``. Compiling the whole graph, AOTAutograd
    asks dynamo to specialize them (``TensorifyScalarRestartAnalysis``); compiling
    segments with fake inputs cannot, and fails. So ask for the same restart first, and
    fold the reads whose values are constants already (``_fold_constant_reads``).
    """
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState
    from torch.utils._sympy.symbol import SymT, symbol_is_type
    names = set()
    for node in gm.graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.SymFloat):
            names |= {str(s) for s in val.node.expr.free_symbols if symbol_is_type(s, SymT.FLOAT)}
    names = {n for n in names if not TensorifyState.should_specialize(n)}
    if names:
        for n in names:
            TensorifyState.specialize(n)
        raise TensorifyScalarRestartAnalysis
    _fold_constant_reads(gm)


def _fold_constant_reads(gm: fx.GraphModule) -> None:
    """Replace each ``.item()`` read whose value dynamo already made a constant by that number
    (a float, int or bool with no free symbol).

    Dynamo can hand over a graph that still reads a specialized float back from its tensor
    (seen: norm eps under ``dynamic=True`` on a warm start, the value a constant ``SymFloat``).
    Compiled whole, AOTAutograd reads it off the example tensor's memo; a segment's example
    inputs are fakes of another mode, so the read inside a segment is data-dependent and
    fails, and dynamo falls back with a graph break. Folded, the tensor input goes unused.
    """
    folded = False
    for node in list(gm.graph.nodes):
        val = node.meta.get("example_value", node.meta.get("val"))
        kind = {torch.SymFloat: float, torch.SymInt: int, torch.SymBool: bool}.get(type(val))
        if (kind is not None and not val.node.expr.free_symbols
                and reads_back(node)):
            number = kind(val.node.expr)
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: number if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: number if a is node else a)
            gm.graph.erase_node(node)
            folded = True
    if folded:
        gm.graph.lint()
        gm.recompile()


def _report_unproven(unproven: dict[str, list[str]], strict: bool, state: ModelState) -> None:
    """Blocks left out of the cached middle because an output's role is not proven."""
    what = "; ".join(f"{block} returns {', '.join(repr(o) for o in outs)}" for block, outs in unproven.items())
    msg = (f"cachec: cannot prove which carried input these outputs continue ({what}): no residual path "
           f"(adds, casts, cat and slices) leads to them from one block input of their shape. Rather than "
           f"pair them by shape, those blocks run on every step; the rest of the middle is cached.")
    if strict:
        raise ValueError(msg + " (strict=True)")
    if "unproven" not in state.warned:
        state.warned.add("unproven")
        warnings.warn(msg, CachecWarning, stacklevel=2)


def _plain_compile(opts: BackendOptions, gm: fx.GraphModule, example_inputs: list) -> Callable:
    """``gm`` compiled with the inner backend alone (its inductor options applied)."""
    if opts.inner_backend == "eager":
        return forward_of(gm)
    patches = _inductor_patches(opts)
    extra = {"config_patches": patches} if patches else {}
    return lookup_backend(opts.inner_backend)(gm, example_inputs, **extra)


def _inductor_patches(opts: BackendOptions) -> dict:
    """The inductor config every piece compiles with: the user's ``inductor`` options over
    cachec's defaults. ``size_asserts=False``: inductor's generated code checks the size
    and stride of every input on every call (about 0.2 ms a call on the 6 + 12 block tiny
    FLUX on CPU, bench/results/percall_cpu.md); the checks are redundant here, since dynamo
    guards the inputs of the first piece and every later piece takes what an earlier one
    returned or a cached output laid out like it (``runtime.gate.Region``)."""
    if opts.inner_backend != "inductor":
        return dict(opts.inductor)
    return {"size_asserts": False, **opts.inductor}


def _shard(opts: BackendOptions, gm: fx.GraphModule, example_inputs: list):
    """Ulysses: rewrite ``gm`` for this rank (``passes.ulysses``). Returns (what it did,
    the process group), or (None, None) where the graph holds no block chain (it then
    runs whole on every rank, as the graphs around a graph break do)."""
    group, world, rank = opts.ulysses.resolve()
    if torch._dynamo.config.automatic_dynamic_shapes:
        # the pass cuts static shapes; without this, a call of a new shape (a CFG branch with a
        # longer prompt, a new resolution) would recompile with symbolic sizes and be refused
        torch._dynamo.config.automatic_dynamic_shapes = False
        warnings.warn("cachec: Ulysses cuts static shapes, so this process now recompiles a new input shape "
                      "statically (torch._dynamo.config.automatic_dynamic_shapes = False)", CachecWarning,
                      stacklevel=3)
    try:
        inputs = find_graph_inputs(gm)
        chain = find_block_chain(gm, find_block_loops(gm), inputs)
    except NoBlockChain as why:
        warnings.warn(f"cachec: Ulysses found no block chain in this graph ({why}); it runs whole on each of the "
                      f"{world} ranks", CachecWarning, stacklevel=3)
        return None, None
    info = shard_graph(gm, chain, world, rank, group.group_name, opts.ulysses.comm)
    seen = [None] * world   # every rank must have cut alike, or the collectives would not pair up
    torch.distributed.all_gather_object(seen, info.signature(), group=group)
    if any(s != seen[0] for s in seen):
        raise ValueError(f"cachec: the ranks of the Ulysses group cut the graph differently ({seen}): every rank "
                         f"must compile the same model with the same input shapes and options")
    return info, group


def cachec_backend(gm: fx.GraphModule, example_inputs: list, *, options: Optional[dict] = None) -> Callable:
    """Dynamo backend: rewrite the block chain of ``gm`` into a cached graph."""
    opts = parse_options(options)
    if opts.recompile_limits:
        set_compile_configs(**{k: opts.recompile_limits.get(k) for k in ("recompile_limit",
                                                                           "accumulated_recompile_limit")})
    parallel, group = None, None
    if opts.ulysses is not None and opts.ulysses.ulysses_size > 1:
        if opts.cache_config is not None and strategy_for(opts.cache_config).lagged:
            raise ValueError(f"cachec: {opts.cache_config.cache_type} measures during one call and reads the "
                             f"result in the next, which Ulysses cannot reduce across ranks yet: use DBCache, "
                             f"TeaCache, PAB, DBPrune or SCM with ulysses_size, or leave ulysses_size out")
        parallel, group = _shard(opts, gm, example_inputs)
    if opts.cache_config is None:     # {"flexcache": None}: caching off for this model
        return _plain_compile(opts, gm, example_inputs)
    if not is_enabled():              # CACHEC_ENABLE=0 / cachec.set_enabled(False): off for the process
        log_disabled_once()
        return _plain_compile(opts, gm, example_inputs)
    _specialize_float_inputs(gm)
    module = _traced_module()
    state = _model_state(opts, module)
    cfg = opts.cache_config
    brk = _graph_break_reason()
    if brk and brk not in state.graph_breaks:
        state.graph_breaks.append(brk)
    strategy = strategy_for(cfg)
    try:
        inputs, chain, plan, (measured, fallback) = plan_graph(gm, cfg.Fn_compute_blocks, cfg.Bn_compute_blocks,
                                                               strategy.granularity, strategy.signal,
                                                               getattr(cfg, "head_groups", 1))
        _check_whole(chain, module)
    except NoBlockChain as why:
        if opts.strict:
            raise ValueError(f"cachec: no cacheable block chain in this graph ({why}) (strict=True)") from None
        return _plain_graph(_plain_compile(opts, gm, example_inputs), gm, state, str(why), opts.inner_backend)
    if plan.unproven:
        _report_unproven(plan.unproven, opts.strict, state)
    if fallback and "gate input" not in state.warned:
        state.warned.add("gate input")
        warnings.warn(f"cachec: {cfg.cache_type} gates on the first block's timestep-modulated input, but this "
                      f"graph has {fallback}: it measures the hidden states entering the first block instead",
                      CachecWarning, stacklevel=2)
    info = {   # the model's state takes it once the graph compiled: a graph that failed to compile
        "gate_input": measured,   # leaves no chain behind, so the plain graphs after it still warn
        "blocks": chain.names,
        "segments": [(s.kind, list(s.blocks)) for s in plan.segments],
        "unpaired": plan.unpaired() if strategy.granularity in ("stretch", "block") else [],   # PAB: all of them
        "unproven": dict(plan.unproven),
        "regions": {k: _region_label(plan.segments[k]) for k in plan.regions()},
    }
    fake_mode = detect_fake_mode(example_inputs) or TracingContext.get().fake_mode
    shared = [0, 0]
    compile_graph = _inner_compiler(opts, fake_mode, shared)
    pieces, layout = [], None
    for k, seg in enumerate(plan.segments):
        if k == plan.gate_segment:
            gate, layout = _gate_graph(compile_graph, plan, strategy, fake_mode)
            pieces.append(gate)
        elif seg.kind == "mid":   # returns the residuals it stores after its outputs
            pieces.append(compile_graph(fuse_residuals(plan.submodule(seg), seg.residual_of),
                                        plan.example_inputs(seg)))
        else:
            pieces.append(compile_graph(plan.submodule(seg), plan.example_inputs(seg)))
    info["shared"] = tuple(shared)
    calibrator = cfg.calibrator()
    regions = _region_calibrators(compile_graph, plan, calibrator, fake_mode) if calibrator is not None else {}
    handler = strategy(cfg, plan, chain.names, model=type(module).__name__ if module is not None else "")
    timesteps = {i: inputs.name(i) for i in inputs.timestep_candidates}
    cached = CachedGraph(plan, pieces, layout, handler, regions, state, timesteps, inputs.user_inputs, group)
    info["ulysses"] = parallel
    state.chain_info = info
    return cached


def _find_state(model: Any, create: bool = False) -> ModelState:
    """The cachec state of a compiled model (or its original module); with ``create``,
    an empty one where the first call has not compiled yet."""
    seen = set()
    todo = [model]
    wrapper = None
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        state = getattr(obj, "__dict__", {}).get(_STATE_ATTR)
        if state is not None:
            return state
        if wrapper is None and isinstance(obj, torch._TorchCompileWrapper):
            wrapper = obj
        todo += [getattr(obj, a, None) for a in ("_torchdynamo_orig_backend", "_torchdynamo_orig_callable",
                                                 "dynamo_ctx", "callback", "_orig_mod")]
    # where the backend will look for it (``_model_state``): the compile wrapper, else the module
    holder = wrapper if wrapper is not None else getattr(model, "_orig_mod", None)
    if create and holder is not None:
        state = holder.__dict__[_STATE_ATTR] = ModelState(None)
        return state
    raise ValueError(f"{type(model).__name__} has no cachec state: pass what torch.compile(..., backend='cachec') "
                     f"returned (or its original module) after calling it at least once")


def summary(model: Any, request: Hashable = None) -> CacheSummary:
    """What the last generation computed and cached. Accepts the compiled or the original module.

    The generation is the calling thread's (or, inside ``cachec.request(model, key)``,
    that request's); where the calling thread made no call, the last one that
    finished in any thread. ``request=key`` names a request explicitly.
    """
    state = _find_state(model)
    return summarize(state, state.summary_state(request))


def refresh(model: Any, num_inference_steps: Optional[int] = None) -> None:
    """Start a new generation on the next call of the calling thread (or of the request
    it is in), optionally with a new step count. Before the first call it only sets the
    step count (the first call starts a generation anyway)."""
    _find_state(model, create=True).current().refresh(num_inference_steps)


@contextlib.contextmanager
def request(model: Any, key: Hashable) -> Iterator[None]:
    """Calls inside belong to request ``key``: its own steps, branches and residuals.

        with cachec.request(compiled, "req-17"):
            out = compiled(x, t)

    Enter it around each call (or each step) of a request, so the steps of several
    requests can alternate in one thread. A request whose generation finished
    (its step count known from ``num_inference_steps`` or the pipeline's step
    index) has already freed its buffers and is forgotten when another key
    opens; otherwise ``cachec.release(model, request=key)`` ends it.
    """
    if not isinstance(key, Hashable) or key is None:
        raise ValueError(f"cachec.request: the key must be hashable and not None, got {key!r}")
    state = _find_state(model, create=True)
    with state.request(key):
        if len(state.requests) > _MANY_REQUESTS and "requests" not in state.warned:
            state.warned.add("requests")
            warnings.warn(f"cachec: {len(state.requests)} requests are open on this model and none of them has "
                          f"finished: their step count is unknown, so their buffers stay until "
                          f"cachec.release(model, request=key). Pass num_inference_steps in the options (or "
                          f"cachec.refresh(model, num_inference_steps=N) inside the request) so they end on "
                          f"their own.", CachecWarning, stacklevel=3)
        yield


def release(model: Any, request: Hashable = None) -> None:
    """Free cachec's activation-sized buffers now: of request ``request`` (which then
    ends), or of every request of the model. The summaries stay readable."""
    _find_state(model).release(request)
