"""Residuals and the gate's signals, fused into the segments' own graphs.

Done apart from a segment, a residual is one more pass over memory (the output
is read again to subtract) and a signal two more (the residual is written, then
read again with the stored one). Added to the segment's graph, the compiler
fuses them into the code that writes the outputs. The measurements that chose
this are in bench/results/fusion_cpu.md; docs/design.md ("Signals and
residuals are fused") says why. What the fused graphs return, position by
position, is defined in ``cachec.plan``.

Precision: inductor takes the residual from the output before rounding it to
the model dtype (one ulp of the output from eager's ``out - in``); the eager
inner backend gives exactly ``out - in``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from ..plan import l1_sums, probe_sums
from .inputs import example_value, static_tensor

__all__ = ["fuse_gate_signals", "fuse_residuals"]


def _residual(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return (out - inp).contiguous()


def _call(graph: fx.Graph, fn: Callable, *args: fx.Node) -> fx.Node:
    """``fn(*args)`` added to ``graph`` (at its insertion point) as the aten ops it runs
    on the arguments' example values, each new node with its example value.

    Not one node calling ``fn``: AOTAutograd's cache refuses a graph that calls a Python
    function it cannot hash, and would trace every piece again on each warm start
    (``Bypassing autograd cache due to: Unsupported call_function target``). Traced, the
    cache key follows what ``fn`` computes, so a changed ``fn`` misses as it should.

    Symbolic sizes (``dynamic=True``): the ops go in when the trace does not depend on the
    sizes (``_size_free_trace``), the result with its symbolic example value; otherwise, and
    without example values at all, one node calls ``fn``."""
    values = [example_value(a) for a in args]
    if all(static_tensor(v) for v in values):
        traced, meta = _trace(fn, [(v.shape, v.stride(), v) for v in values]), True
    else:
        traced, meta = _size_free_trace(fn, values), False
    if traced is None:
        return graph.call_function(fn, args)
    env: dict[fx.Node, fx.Node] = dict(zip(traced.graph.find_nodes(op="placeholder"), args))
    result = None
    for n in traced.graph.nodes:
        if n.op == "output":
            result = fx.node.map_arg(n.args[0], lambda a: env[a])
        elif n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
            env[n].meta = {"example_value": n.meta.get("val"), "val": n.meta.get("val")} if meta else {}
    if not meta and isinstance(result, fx.Node):   # the traced sizes are the hints': the symbolic value
        value = _fake_result(fn, values)
        result.meta = {"example_value": value, "val": value} if isinstance(value, torch.Tensor) else {}
    return result


def _trace(fn: Callable, layouts: list) -> fx.GraphModule:
    """``fn`` traced into aten ops on fake tensors of the given (shape, stride, like)."""
    with FakeTensorMode():   # the examples' own modes may differ (graphs propagated apart)
        return make_fx(fn)(*(torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device)
                             for shape, stride, v in layouts))


def _size_free_trace(fn: Callable, values: list):
    """``fn`` traced for symbolic arguments, or None where the ops depend on the sizes: traced
    at the sizes and strides the symbols' hints give and again with every symbol one larger,
    the two graphs must be the same (so ``.contiguous()`` decided alike, and no size went in)."""
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    hints: dict = {}
    for v in values:
        for d in (*v.shape, *v.stride()):
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                known = getattr(env, "backed_var_to_val", None)
                for sym in d.node.expr.free_symbols:
                    hint = (known if known is not None else env.var_to_val).get(sym)
                    if hint is None:   # data-dependent: no hint to trace at
                        return None
                    hints[sym] = max(2, int(hint))

    def at(bump: int) -> list:
        sub = {sym: h + bump for sym, h in hints.items()}

        def concrete(d):
            return int(d.node.expr.xreplace(sub)) if isinstance(d, torch.SymInt) else d
        return [([concrete(d) for d in v.shape], [concrete(d) for d in v.stride()], v) for v in values]
    try:
        first, second = _trace(fn, at(0)), _trace(fn, at(1))
    except Exception:   # a size expression that does not evaluate at the hints
        return None
    return first if first.code == second.code else None


def _fake_result(fn: Callable, values: list):
    """What ``fn`` returns on the symbolic example values (one fake mode), adding no guard;
    None where that cannot be had."""
    modes = {getattr(v, "fake_mode", None) for v in values}
    mode = modes.pop() if len(modes) == 1 else None
    if mode is None or mode.shape_env is None:
        return None
    try:
        with mode, mode.shape_env.suppress_guards():
            return fn(*values)
    except Exception:
        return None


def _output(graph: fx.Graph) -> fx.Node:
    return next(iter(graph.find_nodes(op="output")))


def fuse_residuals(mid: fx.GraphModule, residual_of: list) -> fx.GraphModule:
    """A copy of a middle segment that also returns, after its outputs, the
    residual ``out - in`` (contiguous) of each output paired with an input
    (``residual_of[i]`` is that input's index, or None), in output order.
    """
    graph = copy.deepcopy(mid.graph)
    placeholders, out_node = list(graph.find_nodes(op="placeholder")), _output(graph)
    outs = tuple(out_node.args[0])
    with graph.inserting_before(out_node):
        residuals = tuple(_call(graph, _residual, o, placeholders[j])
                          for o, j in zip(outs, residual_of) if j is not None)
    out_node.args = (outs + residuals,)
    graph.lint()
    return fx.GraphModule(mid, graph)


def _no_sums(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((0, 2), dtype=torch.float32, device=like.device)


def _snapshot(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)


def fuse_gate_signals(fn: fx.GraphModule, hidden_in: str, hidden_out: int, signal: str,
                      probes: int = 0) -> fx.GraphModule:
    """A copy of the Fn segment with the gate's signals fused in (``plan.GateLayout``).

    ``hidden_in`` names the node of the hidden states entering block 0: an input of
    the segment, or a node inside it where the prologue runs in the segment.
    ``signal="residual"`` (DBCache): takes the stored Fn residual as one more input;
    returns its outputs, this step's residual ``hidden_out - hidden_in`` and the
    partial sums ``[[sum|prev - residual|, sum|prev|]]``. ``prev`` must be contiguous
    and shaped like the hidden states; where there is none yet, any such tensor
    (zeros) gives sums the caller ignores.

    ``signal="probe"`` (per-block strategies): takes ``stored_i, residual_i`` for
    ``probes`` blocks; returns its outputs and ``plan.probe_sums`` of the hidden
    output along them, one row per block.

    ``signal="none"`` (a schedule, PAB): returns its outputs and an empty ``(0, 2)`` sums.
    ``signal="snapshot"``: as "modulated" without the comparison (outputs, the copy, empty sums):
    the caller compares, where the value's shape is symbolic and no stored one can be passed in.

    ``signal="modulated"`` (TeaCache): ``hidden_in`` names the node measured (block 0's
    modulated input, copied into the segment); takes its value at the previous call,
    returns the outputs, a contiguous copy of this call's value in the residual's place,
    and ``[[sum|prev - value|, sum|prev|]]``.
    """
    if signal not in ("residual", "probe", "modulated", "snapshot", "none"):
        raise ValueError(f"signal={signal!r}: expected 'residual', 'probe', 'modulated', 'snapshot' or 'none'")
    gm = fx.GraphModule(fn, copy.deepcopy(fn.graph))
    graph, out_node = gm.graph, _output(gm.graph)
    outs = tuple(out_node.args[0])
    if signal in ("none", "snapshot"):   # no rows: a schedule (PAB), or sums the caller computes
        like = next(o for o in outs if isinstance(example_value(o), torch.Tensor))
        with graph.inserting_before(out_node):
            if signal == "snapshot":
                outs += (_call(graph, _snapshot, next(n for n in graph.nodes if n.name == hidden_in)),)
            out_node.args = (outs + (_call(graph, _no_sums, like),),)
        graph.lint()
        gm.recompile()
        return gm
    if signal in ("residual", "modulated"):
        start = next(n for n in graph.nodes if n.name == hidden_in)
        with graph.inserting_before(out_node):
            outs += (_call(graph, _residual, outs[hidden_out], start) if signal == "residual"
                     else _call(graph, _snapshot, start),)
        extra = ["cachec_prev_residual"]
    else:
        extra = [f"cachec_probe_{kind}_{i}" for i in range(probes) for kind in ("stored", "residual")]
    last = list(graph.find_nodes(op="placeholder"))[-1]
    # what the caller passes in (backend._gate_graph): contiguous, shaped like the residual
    # (the copy, for "modulated") or like the hidden output (probes)
    like = example_value(outs[-1] if signal != "probe" else outs[hidden_out])
    value = None
    if static_tensor(like):
        with FakeTensorMode():   # what ``_call`` reads: sizes, strides, dtype, device
            value = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    elif isinstance(like, torch.Tensor):   # symbolic sizes: a contiguous value in their own mode
        value = _fake_result(lambda x: torch.empty(x.shape, dtype=x.dtype, device=x.device), [like])
    added = []
    for name in extra:
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        if value is not None:
            last.meta = {"example_value": value, "val": value}
        added.append(last)
    with graph.inserting_before(out_node):
        if signal != "probe":
            sums = _call(graph, l1_sums, added[0], outs[-1])
        else:
            sums = _call(graph, probe_sums, outs[hidden_out], *added)
    out_node.args = (outs + (sums,),)
    graph.lint()
    gm.recompile()
    return gm
