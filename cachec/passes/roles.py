"""Residual roles by data flow: which carried input each output of a run of blocks continues.

A DiT block updates each stream it carries through a skip connection:
``h = h + gate * attn(...)``, then ``h = h + gate * ff(...)``. Attention mixes the
streams, so "depends on" proves nothing; the skip path does. ``trace_skip_paths``
follows, forward through the graph, only what keeps a value on its skip path:

- ``add`` (and ``addcmul`` / ``addcdiv``): the operand that is on a skip path, when
  exactly one is (or both are on the same one);
- casts, copies and clamps (``to``, ``float``, ``type_as``, ``contiguous``, ``clip``,
  ...), and reshapes that keep the shape;
- ``cat``, then slices or ``split`` pieces that take one joined part back whole
  (FLUX's single blocks: ``cat([encoder, hidden], dim=1)`` is the skip path,
  ``[:, :text_len]`` and ``[:, text_len:]`` give encoder and hidden back).

An output whose value reaches it along such a path from one carried input, whole,
with that input's shape and dtype, continues that input: its residual is
``output - input``. Shapes, and the order in which blocks read or return their
streams, never decide.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx

from .inputs import example_value, same_size as _eq

__all__ = ["Joined", "trace_skip_paths", "same_layout"]

aten = torch.ops.aten

# value-preserving for roles: the result is the operand, maybe cast, copied or clamped
_SAME_METHODS = {"contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "type_as",
                 "clip", "clamp", "clip_", "clamp_", "detach", "view", "reshape", "view_as", "reshape_as"}
_SAME_FUNCTIONS = {torch.clone, torch.clamp, torch.clip, torch.Tensor.contiguous, torch.Tensor.to,
                   torch.Tensor.float, torch.Tensor.type_as, torch.reshape,
                   aten.clone.default, aten._to_copy.default, aten.clamp.default, aten.view.default,
                   aten.reshape.default, aten.alias.default}
_ADD_METHODS = {"add", "add_", "__add__", "__radd__", "__iadd__"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
_ADDC_METHODS = {"addcmul", "addcdiv", "addcmul_", "addcdiv_"}
_ADDC_FUNCTIONS = {torch.addcmul, torch.addcdiv, aten.addcmul.default, aten.addcdiv.default}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "split_with_sizes"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split, aten.split.Tensor, aten.split_with_sizes.default,
                    aten.chunk.default}


@dataclass(frozen=True, eq=False)   # sizes may be SymInts: compare with ``_same_trace``, never ``==``
class Joined:
    """A tensor joined along ``dim`` from parts ``(size, source or None)``."""
    dim: int
    parts: tuple


def _same_trace(a: "Trace", b: "Trace") -> bool:
    if isinstance(a, Joined) and isinstance(b, Joined):
        return a.dim == b.dim and len(a.parts) == len(b.parts) and all(
            _eq(sa, sb) and _same_trace(pa, pb) for (sa, pa), (sb, pb) in zip(a.parts, b.parts))
    return a is b


Trace = Union[fx.Node, Joined, None]


def same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Same shape and dtype (statically; symbolic sizes compare as expressions)."""
    va, vb = example_value(a), example_value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and va.dim() == vb.dim() and all(
        _eq(x, y) for x, y in zip(va.shape, vb.shape))


def _value(a):
    """A literal, or the example value of a node (a SymInt for a size read in the graph)."""
    return example_value(a) if isinstance(a, fx.Node) else a


def _is(node: fx.Node, methods: set, functions: set) -> bool:
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _shape_of(node) -> Optional[tuple]:
    v = example_value(node) if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _take(t: Trace, dim: int, start, stop, size) -> Trace:
    """The trace of ``t[start:stop]`` along ``dim`` (a tensor of ``size`` there)."""
    if t is None:
        return None
    if isinstance(t, fx.Node):
        return t if _eq(start, 0) and _eq(stop, size) else None
    if t.dim != dim:
        return None
    offset = 0
    for part_size, part in t.parts:
        if _eq(offset, start) and _eq(offset + part_size, stop):
            return part
        offset = offset + part_size
    return None


def _normal_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _slice_trace(node: fx.Node, src: fx.Node, index, env: dict) -> Trace:
    """``src[index]`` where index slices one dim (others whole, step 1)."""
    shape = _shape_of(src)
    if shape is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index) or len(index) > len(shape):
        return None
    cut = None
    for d, i in enumerate(index):
        if not isinstance(i, slice) or _value(i.step) not in (None, 1):
            return None
        if i.start is None and i.stop is None:
            continue
        if cut is not None:
            return None
        cut = d
    if cut is None:
        return env.get(src)
    size = shape[cut]
    start, stop = _value(index[cut].start), _value(index[cut].stop)
    start = 0 if start is None else (start + size if isinstance(start, int) and start < 0 else start)
    stop = size if stop is None else (stop + size if isinstance(stop, int) and stop < 0 else stop)
    if isinstance(stop, int) and isinstance(size, int):
        stop = min(stop, size)
    return _take(env.get(src), cut, start, stop, size)


def _split_piece_trace(split: fx.Node, k: int, env: dict) -> Trace:
    """Piece ``k`` of a split / chunk: the slice it covers, from the pieces' sizes."""
    src, pieces = split.args[0], example_value(split)
    shape = _shape_of(src)
    if shape is None or not isinstance(pieces, (tuple, list)):
        return None
    dim = _normal_dim(int(_value(_arg(split, 2, "dim", 0))), len(shape))
    start = 0
    for p in pieces[:k]:
        start = start + p.shape[dim]
    return _take(env.get(src), dim, start, start + pieces[k].shape[dim], shape[dim])


def _rule(node: fx.Node, env: dict) -> Trace:
    args = node.args
    if _is(node, _SAME_METHODS, _SAME_FUNCTIONS):
        src = args[0] if args else None   # a reshape that changes the shape ends the path
        return env.get(src) if isinstance(src, fx.Node) and _same_sizes(src, node) else None
    if _is(node, _ADD_METHODS, _ADD_FUNCTIONS):
        traced = [env[a] for a in args[:2] if isinstance(a, fx.Node) and env.get(a) is not None
                  and _same_sizes(a, node)]
        if len(traced) == 2 and _same_trace(*traced):   # h + h
            traced.pop()
        return traced[0] if len(traced) == 1 else None
    if _is(node, _ADDC_METHODS, _ADDC_FUNCTIONS):
        src = args[0] if args else None
        return env.get(src) if isinstance(src, fx.Node) and _same_sizes(src, node) else None
    if _is(node, set(), _CAT_FUNCTIONS):
        tensors, dim = _arg(node, 0, "tensors"), _value(_arg(node, 1, "dim", 0))
        shape = _shape_of(node)
        if not isinstance(tensors, (list, tuple)) or shape is None or not isinstance(dim, int):
            return None
        dim = _normal_dim(dim, len(shape))
        parts = tuple((_shape_of(t)[dim], env.get(t)) for t in tensors if isinstance(t, fx.Node))
        if len(parts) != len(tensors) or all(p is None for _, p in parts):
            return None
        return Joined(dim, parts)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(args[0], fx.Node):
        src = args[0]
        if _is(src, _SPLIT_METHODS, _SPLIT_FUNCTIONS) and isinstance(args[1], int):
            return _split_piece_trace(src, args[1], env)
        if isinstance(example_value(src), torch.Tensor):
            return _slice_trace(node, src, args[1], env)
        return None
    if _is(node, {"narrow"}, {torch.narrow, aten.narrow.default}):
        src, dim, start, length = (_value(a) if i else a for i, a in enumerate(args[:4]))
        shape = _shape_of(src)
        if shape is None:
            return None
        dim = _normal_dim(dim, len(shape))
        return _take(env.get(src), dim, start, start + length, shape[dim])
    if _is(node, set(), {aten.slice.Tensor}):
        src = args[0]
        shape = _shape_of(src)
        dim = _normal_dim(_value(_arg(node, 1, "dim", 0)), len(shape))
        start, stop = _value(_arg(node, 2, "start")) or 0, _value(_arg(node, 3, "end"))
        stop = shape[dim] if stop is None else stop
        return _take(env.get(src), dim, start, stop, shape[dim])
    return None


def _same_sizes(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = _shape_of(a), _shape_of(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(_eq(x, y) for x, y in zip(sa, sb))


def trace_skip_paths(nodes: list[fx.Node], carried: list[fx.Node], outputs: list[fx.Node]) -> list[Optional[fx.Node]]:
    """For each of ``outputs``, the carried input it continues along a skip path, or None.

    Expects ``nodes`` in graph order, covering every node between the carried
    inputs and the outputs (a run of blocks with the glue between them).
    Guarantees: a returned input has the output's shape and dtype, and the output
    is that input plus updates along a chain of adds, casts and whole joined
    parts; any other input of the run (a side input such as a ControlNet residual
    or the timestep embedding) never counts as a source.
    """
    env: dict[fx.Node, Trace] = {c: c for c in carried}
    for node in nodes:
        if node in env or node.op in ("placeholder", "output", "get_attr"):
            continue
        try:
            env[node] = _rule(node, env)
        except (TypeError, ValueError, IndexError, AttributeError):   # an op spelled in a way not covered
            env[node] = None
    roles = []
    for o in outputs:
        src = env.get(o)
        roles.append(src if isinstance(src, fx.Node) and same_layout(o, src) else None)
    return roles
