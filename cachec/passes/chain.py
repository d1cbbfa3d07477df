"""Select the block chain: the loops the latent tokens flow through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .inputs import GraphInputs, example_value, is_module_state, same_size
from .loops import Block, BlockLoop


class NoBlockChain(Exception):
    """The graph holds no block loop that the latent flows through; the message says why."""


@dataclass
class BlockChain:
    loops: list[BlockLoop]
    blocks: list[Block]
    carried_in: list[list[fx.Node]]   # per block: the tensors it takes from the previous block
    hidden_in: fx.Node                 # the latent tokens entering block 0
    stretch_starts: set[int]           # block indices where the carried shapes change

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]


def _tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(example_value(n), torch.Tensor)


def _shape(n: fx.Node):
    return tuple(example_value(n).shape)


def _same_shapes(a: list[fx.Node], b: list[fx.Node]) -> bool:
    """The shapes of ``a`` and of ``b`` are one multiset, compared without adding a guard:
    sorting SymInt shapes compares sizes, and each comparison became a dynamo guard (a
    recompile once a resolution crossed it)."""
    rest = [_shape(n) for n in b]
    for shape in map(_shape, a):
        match = next((i for i, other in enumerate(rest) if len(other) == len(shape)
                      and all(same_size(x, y) for x, y in zip(shape, other))), None)
        if match is None:
            return False
        rest.pop(match)
    return not rest


def _reachable(start: fx.Node, step) -> set[fx.Node]:
    """``start`` and every node reached by repeatedly following ``step(node)``."""
    seen, todo = {start}, [start]
    while todo:
        for n in step(todo.pop()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _uses(nodes: list[fx.Node], b: Block, pos: dict) -> list[fx.Node]:
    """Tensors defined before block ``b`` and read inside it, in order of first use."""
    out: dict[fx.Node, None] = {}
    for n in nodes[b.first:b.last + 1]:
        for a in n.all_input_nodes:
            if pos[a] < b.first and _tensor(a) and not (a.op == "placeholder" and is_module_state(a)):
                out.setdefault(a)
    return list(out)


def find_block_chain(gm: fx.GraphModule, loops: list[BlockLoop], inputs: GraphInputs) -> BlockChain:
    """Keep the loops on the latent's path from input to output and chain them.

    Expects ``loops`` from ``find_block_loops``. Guarantees: the chain's blocks
    are in graph order; ``carried_in[b]`` lists the tensors block ``b`` takes
    from the previous block (for block 0: what it reads that block 1 does not);
    ``stretch_starts`` holds each block whose carried shapes differ from the
    previous block's (text and image tokens joined into one sequence, say): a
    residual across that point is undefined. Raises ``NoBlockChain``.
    """
    if not loops:
        raise NoBlockChain("no ModuleList loop of two or more blocks of one class in this graph")
    if inputs.latent is None:
        raise NoBlockChain("no tensor input that could be the latent")
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    latent = inputs.placeholders[inputs.latent]
    from_latent = _reachable(latent, lambda n: n.users)
    to_output = _reachable(next(iter(gm.graph.find_nodes(op="output"))), lambda n: n.all_input_nodes)
    chained = [lp for lp in loops
               if any(n in from_latent for n in nodes[lp.blocks[0].first:lp.blocks[0].last + 1])
               and any(n in to_output for n in nodes[lp.blocks[-1].first:lp.blocks[-1].last + 1])]
    if not chained:
        names = ", ".join(f"{lp.container} ({len(lp.blocks)} x {lp.cls.__name__})" for lp in loops)
        raise NoBlockChain(f"none of the loops [{names}] lies on the path of the latent input "
                           f"'{inputs.name(inputs.latent)}' to the output")
    # in graph order: loops may interleave (Latte runs spatial block i, then temporal block i)
    blocks = sorted((b for lp in chained for b in lp.blocks), key=lambda b: b.first)
    uses = [_uses(nodes, b, pos) for b in blocks]
    carried = [[a for a in uses[0] if a not in set(uses[1])]]
    for k in range(1, len(blocks)):
        prev_start = blocks[k - 1].first
        carried.append([a for a in uses[k] if pos[a] >= prev_start])
    if not carried[0]:
        raise NoBlockChain(f"block {blocks[0].name} takes no tensor that block {blocks[1].name} does not")
    hidden = next((a for a in carried[0] if a in from_latent), carried[0][0])
    stretch_starts = {k for k in range(1, len(blocks)) if not _same_shapes(carried[k], carried[k - 1])}
    return BlockChain(chained, blocks, carried, hidden, stretch_starts)
