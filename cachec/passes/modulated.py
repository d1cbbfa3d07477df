"""Find the first block's timestep-modulated input and compute a copy of it before the chain.

TeaCache gates on the output of the first block's adaptive norm: the hidden states
normalized, then scaled and shifted by values made from the timestep embedding
(``norm(x) * (1 + scale) + shift``, as AdaLayerNormZero, Wan's and PixArt's blocks
write it). It has to be known before any block runs, so the nodes that make it
inside block 0 are copied in front of the chain, where the gate's segment
computes them (a norm and the block's modulation projection: a small share of
one block).

The rule, by data flow, never by class names: in block 0, the first node that
(1) depends on the hidden states through a normalization (``layer_norm``,
``rms_norm``, ``group_norm`` or an ``rsqrt``), (2) takes an operand that
depends on the timestep input and not on the hidden states, and (3) has the
hidden states' shape. Adds, subtracts and multiplies by more timestep-only
operands right after it (the shift after the scale) belong to it too.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .chain import BlockChain
from .inputs import GraphInputs, example_value, reads_scalar, same_size

__all__ = ["find_modulated_input", "copy_before_chain"]

_NORMS = ("layer_norm", "rms_norm", "group_norm", "rsqrt")
_COMBINE = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.addcmul}
_COMBINE_METHODS = {"add", "sub", "mul", "addcmul"}


def _is_norm(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _NORMS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.lstrip("_") in _NORMS
    return False


def _combines(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _COMBINE) or (
        node.op == "call_method" and node.target in _COMBINE_METHODS)


def _shaped_like(node: fx.Node, like: fx.Node) -> bool:
    a, b = example_value(node), example_value(like)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(same_size(x, y) for x, y in zip(a.shape, b.shape)))


def find_modulated_input(gm: fx.GraphModule, chain: BlockChain, inputs: GraphInputs) -> Optional[fx.Node]:
    """The node of block 0's timestep-modulated input (module docstring), or None."""
    nodes = list(gm.graph.nodes)
    block = chain.blocks[0]
    inside = nodes[block.first:block.last + 1]
    sources = [inputs.placeholders[i] for i in inputs.timestep_candidates]
    if not sources:
        return None
    from_t: set[fx.Node] = set(sources)
    for n in nodes[:block.last + 1]:
        if n not in from_t and any(a in from_t for a in n.all_input_nodes):
            from_t.add(n)
    hidden = chain.hidden_in
    from_h, normed = {hidden}, set()
    for n in inside:
        ins = n.all_input_nodes
        if not any(a in from_h for a in ins):
            continue
        from_h.add(n)
        if _is_norm(n) or any(a in normed for a in ins):
            normed.add(n)
        if (n in normed and _combines(n) and _shaped_like(n, hidden)
                and any(a in from_t and a not in from_h for a in ins)):
            return _extend(n, from_t, from_h, hidden)
    return None


def _extend(node: fx.Node, from_t: set, from_h: set, hidden: fx.Node) -> fx.Node:
    """Follow single-user scale/shift steps by timestep-only operands (``* (1 + scale) + shift``)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        others = [a for a in user.all_input_nodes if a is not node]
        if not (_combines(user) and _shaped_like(user, hidden) and others
                and all(a in from_t and a not in from_h for a in others)):
            break
        from_h.add(user)
        node = user
    return node


def copy_before_chain(gm: fx.GraphModule, chain: BlockChain, node: fx.Node) -> str:
    """Copy ``node`` and its ancestors inside block 0 in front of the chain, outside every
    block (their module stack dropped, so the loop finder leaves them to the prologue);
    return the copy's name. A node made before the chain (the hidden states, where there
    is no modulated input) gets a ``detach`` in front of the chain instead, so that the
    segment before the chain takes it in even where it is a graph input. Raises
    ``ValueError`` where an ancestor writes in place."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    first = chain.blocks[0].first
    if pos[node] < first:
        with gm.graph.inserting_before(nodes[first]):
            c = gm.graph.call_method("detach", (node,))
        c.meta = {k: v for k, v in node.meta.items() if k in ("val", "example_value", "tensor_meta")}
        gm.recompile()
        return c.name
    need, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in need or pos[n] < first:
            continue
        if n.op not in ("call_function", "call_method", "call_module"):
            raise ValueError(f"{n.name} ({n.op}) inside the first block cannot be copied")
        target = getattr(n.target, "__name__", str(n.target))
        if target.endswith("_") and not target.endswith("__"):
            raise ValueError(f"{n.name} writes in place ({target})")
        if reads_scalar(n):
            raise ValueError(f"{n.name} reads a Python number back from a tensor (dynamic=True hands norm eps "
                             f"over this way), which the segment before the chain cannot compile")
        need.add(n)
        todo += n.all_input_nodes
    env: dict[fx.Node, fx.Node] = {}
    with gm.graph.inserting_before(nodes[first]):
        for n in sorted(need, key=pos.__getitem__):
            c = gm.graph.node_copy(n, lambda a: env.get(a, a))
            c.meta = {k: v for k, v in n.meta.items() if k not in ("nn_module_stack", "source_fn_stack")}
            env[n] = c
    gm.graph.lint()
    gm.recompile()
    return env[node].name
