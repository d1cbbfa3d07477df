"""Compile identical blocks once: outline each block into a shared ``invoke_subgraph``.

Inductor compiles every node it is handed, so a piece holding 37 FLUX single
blocks compiles the same block 37 times. This pass replaces each block's nodes
by a call of ``torch.ops.higher_order.invoke_subgraph`` (the operator behind
``torch.compiler.nested_compile_region``) on a subgraph that takes the block's
parameters as inputs. Blocks whose subgraphs are structurally equal, with
inputs of equal sizes, strides and dtypes, share one subgraph module and one
identifier: AOTAutograd traces it once and inductor lowers and compiles it
once, then calls it per block (bench/results/compile_cpu.md has the numbers).

Rules:

* A block is a run of consecutive nodes whose outermost indexed module is the
  same container item (``passes.loops.outermost_item``), as the chain finder
  sees them. Nodes the passes added (residuals, signals) carry no module and
  stay outside.
* Views at the end of a block (a slice of the joint sequence handed on as the
  image tokens) stay in the outer graph, after the call: inductor 2.13 places
  a subgraph output that is a view at an offset of its buffer twice, and the
  result is wrong (seen: FLUX single blocks, garbage or a heap corruption).
* What a block computes from values that every block of its structure reads alike
  (FLUX's ``silu(temb)`` ahead of each block's modulation; not the carried hidden
  states, not the block's own parameters) moves out in front of its call, and equal
  such nodes of different blocks become one (``_outline_parts``, ``_merge_equal``).
  Inline, inductor fused that work into a kernel of the block before; outlined, each
  call would run it again as kernels and buffers of its own. Views stay inside (free
  there; inductor rebuilds a view operand on every call), and so does anything
  written in place or random.
* A block whose structure occurs only once in the piece stays inline.
* Blocks with symbolic sizes (``dynamic=True``) or non-tensor inputs are left
  inline: inductor's subgraph operands are tensors of fixed layout. So are blocks
  that write in place into a tensor made outside them (in-place writes into their
  own tensors are fine), and the backend compiles a segment inline if compiling it
  outlined fails for any other reason (with a warning).

The subgraph checks no input layout of its own (``no_subgraph_input_asserts``):
``InvokeSubgraph.create`` already copies each operand to the layout the
subgraph was compiled for, so the check is redundant, and at 37 inputs per
block it cost ~10% of a call of the tiny FLUX on CPU.
"""
from __future__ import annotations

import collections
import contextlib
import operator
from typing import Iterator

import torch
import torch.fx as fx

from .inputs import example_value, static_tensor
from .loops import outermost_item

_COMPUTE = ("call_function", "call_method", "call_module")
SUBGRAPH_PREFIX = "cachec_block_"


def _block_runs(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Runs of consecutive compute nodes with one outermost container item."""
    runs, current = [], None
    for n in gm.graph.nodes:
        item = outermost_item(n) if n.op in _COMPUTE else None
        key = item[:2] if item is not None else None
        if key is not None and key == current:
            runs[-1].append(n)
        elif key is not None:
            runs.append([n])
        current = key
    return runs


def _is_view(n: fx.Node) -> bool:
    v = example_value(n)
    if isinstance(v, torch.Tensor):
        return v._is_view()
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return all(x._is_view() for x in v)
    return False


def _values_static(n: fx.Node) -> bool:
    v = example_value(n)
    if isinstance(v, (tuple, list)):
        return all(static_tensor(x) or not isinstance(x, (torch.Tensor, torch.SymInt)) for x in v)
    return v is None or static_tensor(v) or not isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat))


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor}


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _in_place(n: fx.Node) -> bool:
    """An in-place op: ``x.add_``, ``torch.relu_(x)``, ``x[i] = y``, ``a += b``, ``out=``."""
    if n.op == "call_method":
        return _trailing_underscore(n.target)
    if n.op == "call_function":
        return (n.target in _IN_PLACE_OPERATORS or "out" in n.kwargs
                or _trailing_underscore(getattr(n.target, "__name__", "")))
    return False


def _mutates_input(n: fx.Node, inside: set) -> bool:
    """An in-place op on a tensor made outside the block, or on a view of one: AOTAutograd
    cannot carry a mutation of a subgraph input out of ``invoke_subgraph``, so such blocks
    stay inline. In-place writes into the block's own tensors (Wan's rotary embedding fills
    ``out[..., 0::2]`` of a fresh tensor) are functionalized inside the subgraph."""
    if not _in_place(n):
        return False
    target = n.kwargs["out"] if "out" in n.kwargs else (n.args[0] if n.args else None)
    while isinstance(target, fx.Node) and target in inside and _is_view(target) and target.all_input_nodes:
        target = target.all_input_nodes[0]   # a view's base is its first tensor argument
    return not isinstance(target, fx.Node) or target not in inside


_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform")


def _written(n: fx.Node) -> bool:
    """Whether an in-place op writes into ``n``, directly or through views of it."""
    return any(_in_place(u) or (_is_view(u) and _written(u)) for u in n.users)


def _hoistable(n: fx.Node, outside) -> bool:
    """A pure node whose inputs all satisfy ``outside`` and whose value is a tensor of
    its own (not a view)."""
    if n.op not in ("call_function", "call_method") or _in_place(n) or n.is_impure():
        return False
    name = str(getattr(n.target, "__name__", n.target)).lower()
    if any(r in name for r in _RANDOM) or _written(n):
        return False
    if not static_tensor(example_value(n)) or _is_view(n):
        # a subgraph takes tensors of fixed layout; a view costs nothing inside, while
        # inductor rebuilds a view operand (``reinterpret_tensor``) on every call
        return False
    return all(outside(a) for a in n.all_input_nodes)


def _outline_parts(run: list[fx.Node], common: tuple[int, ...] = ()):
    """(hoisted, body, inputs, outputs) of one block, its trailing views left out; None
    when it cannot be outlined. ``common``: positions among the inputs of the block
    outlined as a whole that hold the same value in every block of its structure (FLUX's
    ``temb``); what the block computes from those alone goes into ``hoisted``."""
    parts = _parts(run, [])
    if parts is None or not common:
        return parts
    same = {parts[2][i] for i in common}
    hoisted: list[fx.Node] = []
    for n in run:
        if _hoistable(n, lambda a: a in same):
            hoisted.append(n)
            same.add(n)
    return (_parts(run, hoisted) or parts) if hoisted else parts   # or without, if that broke a rule


def _parts(run: list[fx.Node], hoisted: list[fx.Node]):
    inside = set(run).difference(hoisted)
    run = [n for n in run if n in inside]
    tail: set[fx.Node] = set()
    for n in reversed(run):
        # a pure view read after the block; never an in-place op (its result is a view too,
        # often unused): moved after the call it would write after the block read the tensor
        if (_is_view(n) and n.users and not _in_place(n)
                and all(u not in inside or u in tail for u in n.users)):
            tail.add(n)
    body = [n for n in run if n not in tail]
    if not body:
        return None
    inside = set(body)
    if any(_mutates_input(n, inside) for n in body):
        return None
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    if not outputs or not all(static_tensor(example_value(a)) for a in inputs):
        return None
    if any(_is_view(o) for o in outputs):   # a view the block itself reads: not one to hand out
        return None
    if not all(_values_static(n) for n in body) or not all(static_tensor(example_value(o)) for o in outputs):
        return None
    return hoisted, body, inputs, outputs


def _structure(body: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> tuple:
    """What makes two blocks share a subgraph: the ops with their arguments as positions,
    and the layout of each input."""
    index = {a: i for i, a in enumerate(inputs)}
    index.update({n: len(inputs) + i for i, n in enumerate(body)})

    def norm(x):
        return repr(fx.node.map_arg(x, lambda a: ("ref", index[a])))
    ops = tuple((n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in body)
    layouts = tuple((tuple(v.shape), v.stride(), v.dtype, v.device)
                    for v in (example_value(a) for a in inputs))
    return ops, layouts, tuple(index[o] for o in outputs)


def _subgraph(owner: fx.GraphModule, body: list[fx.Node], inputs: list[fx.Node],
              outputs: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(inputs):
        p = graph.placeholder(f"arg{i}")
        p.meta = dict(a.meta)
        env[a] = p
    for n in body:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(owner, graph)


def share_blocks(gm: fx.GraphModule) -> tuple[int, int]:
    """Outline every block of ``gm`` into an ``invoke_subgraph`` call, blocks of equal
    structure sharing one subgraph. A block whose structure occurs once in ``gm`` stays
    inline: it compiles once either way, and inline it keeps the fusion with its
    neighbours and costs no call. Returns (blocks outlined, distinct subgraphs).

    Expects a dynamo-level graph (a piece of the split graph) whose nodes carry
    ``nn_module_stack`` and ``example_value``/``val``. Guarantees: the graph computes
    what it computed, node for node; each block's outputs keep their names' meta.
    """
    runs = _block_runs(gm)
    parts = [_outline_parts(run) for run in runs]
    keys = [None if p is None else _structure(*p[1:]) for p in parts]
    repeats = collections.Counter(k for k in keys if k is not None)
    common = {}   # per structure: the input positions every block of it reads the same value at
    for p, k in zip(parts, keys):
        if k is not None:
            common[k] = [a if a is p[2][i] else None for i, a in enumerate(common.get(k, p[2]))]
    common = {k: tuple(i for i, a in enumerate(v) if a is not None) for k, v in common.items()}
    shared: dict[tuple, str] = {}
    outlined = 0
    hoisted_all: list[fx.Node] = []
    for run, first_key in zip(runs, keys):
        if first_key is None or repeats[first_key] < 2:   # once: inline keeps its fusion, costs no call
            continue
        # again: outlining the blocks before this one replaced its inputs by their calls' items
        hoisted, body, inputs, outputs = _outline_parts(run, common[first_key])
        key = _structure(body, inputs, outputs)
        name = shared.get(key)
        if name is None:
            name = shared[key] = f"{SUBGRAPH_PREFIX}{len(shared)}"
            gm.add_submodule(name, _subgraph(gm, body, inputs, outputs))
        inside = set(body)
        for n in hoisted:   # inputs first: in front of the block's first node, in order
            body[0].prepend(n)
        hoisted_all += hoisted
        with gm.graph.inserting_before(body[0]):
            attr = gm.graph.get_attr(name)
            call = gm.graph.call_function(torch.ops.higher_order.invoke_subgraph, (attr, name, *inputs))
            call.meta["val"] = call.meta["example_value"] = tuple(example_value(o) for o in outputs)
            for i, o in enumerate(outputs):
                item = gm.graph.call_function(operator.getitem, (call, i))
                item.meta = dict(o.meta)
                o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
        for n in reversed(body):
            gm.graph.erase_node(n)
        outlined += 1
    _merge_equal(gm, hoisted_all)
    if outlined:
        gm.graph.lint()
        gm.recompile()
    return outlined, len(shared)


def _merge_equal(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Nodes among ``nodes`` that repeat an earlier one (same operation on the same
    arguments) are replaced by it: the hoisted ``silu(temb)`` of every block becomes one."""
    seen: dict[tuple, fx.Node] = {}
    for n in nodes:
        key = (n.op, n.target, repr(n.args), repr(n.kwargs))   # a node's repr is its unique name
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)


@contextlib.contextmanager
def no_subgraph_input_asserts() -> Iterator[None]:
    """While compiling: subgraphs skip the input layout checks the caller already
    guarantees (module docstring). Where this torch has no such hook, nothing changes."""
    try:
        from torch._inductor.codegen.wrapper import SubgraphPythonWrapperCodegen as Codegen
    except ImportError:
        yield
        return
    name = "codegen_input_size_and_nan_asserts"
    if not hasattr(Codegen, name):
        yield
        return
    had = name in vars(Codegen)
    old = vars(Codegen).get(name)
    setattr(Codegen, name, lambda self: None)
    try:
        yield
    finally:
        if had:
            setattr(Codegen, name, old)
        else:
            delattr(Codegen, name)
