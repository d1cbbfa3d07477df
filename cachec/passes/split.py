"""Cut the graph into prologue | Fn | middle | Bn | epilogue segments."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from .chain import BlockChain, NoBlockChain
from .inputs import example_value

@dataclass
class Segment:
    # prologue, fn, glue, mid, bn or epilogue. Only "mid" segments are gated;
    # "glue" joins two stretches whose carried shapes differ (text and image
    # tokens concatenated) and always runs, like the rest.
    kind: str
    blocks: list[str]
    module_name: str = ""                       # submodule name in the split parent
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # mid segments: for each output, the index of the input it is a residual of
    # (None: the output is reused as a value on cached steps)
    residual_of: list[int | None] = field(default_factory=list)


@dataclass
class SplitPlan:
    parent: fx.GraphModule
    segments: list[Segment]
    gate_segment: int          # index of the fn segment whose residual drives the gate
    gate_hidden_in: int        # its input index of the hidden states
    gate_hidden_out: int       # its output index of the hidden states
    example_values: dict[str, object]   # original node name -> fake value

    def submodule(self, seg: Segment) -> fx.GraphModule:
        return getattr(self.parent, seg.module_name)

    def example_inputs(self, seg: Segment) -> list:
        return [self.example_values[n] for n in seg.input_names]


def _shape_key(n: fx.Node) -> tuple:
    v = example_value(n)
    return (str(v.dtype), tuple(str(d) for d in v.shape)) if isinstance(v, torch.Tensor) else None


def pair_residuals(inputs: list[fx.Node], outputs: list[fx.Node]) -> list[int | None]:
    """For each output, the carried input of the same shape and dtype it replaces.

    Both lists are in order of first use, so when the hidden and encoder states
    happen to share a shape the order decides, as the blocks read them.
    """
    free = list(range(len(inputs)))
    pairs: list[int | None] = []
    for o in outputs:
        j = next((j for j in free if _shape_key(inputs[j]) == _shape_key(o)), None)
        if j is not None:
            free.remove(j)
        pairs.append(j)
    return pairs


def _pieces(chain: BlockChain, Fn: int, Bn: int) -> list[tuple[str, int, int]]:
    n = len(chain.blocks)
    role = lambda b: "fn" if b < Fn else ("bn" if b >= n - Bn else "mid")
    pieces: list[list] = []
    for b in range(n):
        if pieces and pieces[-1][0] == role(b) and b not in chain.stretch_starts:
            pieces[-1][2] = b
        else:
            pieces.append([role(b), b, b])
    return [tuple(p) for p in pieces]


def split_chain(gm: fx.GraphModule, chain: BlockChain, Fn: int, Bn: int) -> SplitPlan:
    """Split ``gm`` around the chain.

    Expects ``Fn >= 1``, ``Bn >= 0`` and ``Fn + Bn`` below the chain length.
    Guarantees: the parent graph calls one submodule per segment, in order,
    each returning a tuple; every block belongs to exactly one fn/mid/bn
    segment; a mid segment never crosses a stretch boundary, so each of its
    outputs that has a same-shaped carried input gets a residual pairing.
    """
    n = len(chain.blocks)
    if Fn + Bn >= n:
        raise ValueError(
            f"Fn_compute_blocks={Fn} + Bn_compute_blocks={Bn} = {Fn + Bn} leaves no block to cache: "
            f"the model has {n} chained blocks ({', '.join(lp.container + ' x' + str(len(lp.blocks)) for lp in chain.loops)}); "
            f"use Fn + Bn <= {n - 1}")
    nodes = list(gm.graph.nodes)
    pos = {nd: i for i, nd in enumerate(nodes)}
    blocks = chain.blocks
    # (start position, kind, block names) of each segment, in graph order
    starts: list[tuple[int, str, list[str]]] = [(0, "prologue", [])]
    for kind, s, e in _pieces(chain, Fn, Bn):
        if s in chain.stretch_starts and blocks[s - 1].last + 1 < blocks[s].first:
            starts.append((blocks[s - 1].last + 1, "glue", []))
        # glue between two same-shaped stretches travels with the segment after it
        begin = blocks[s].first if (s == 0 or s in chain.stretch_starts) else blocks[s - 1].last + 1
        starts.append((begin, kind, [b.name for b in blocks[s:e + 1]]))
    starts.append((blocks[-1].last + 1, "epilogue", []))
    bounds = [p for p, _, _ in starts]

    def partition(node: fx.Node) -> int:
        return bisect.bisect_right(bounds, pos[node]) - 1

    parent = split_module(gm, None, partition, keep_original_order=True,
                          keep_original_node_name=True, tuple_return=True)
    by_name = {nd.name: nd for nd in nodes}
    segments: list[Segment] = []
    calls = [nd for nd in parent.graph.nodes if nd.op == "call_module"]
    call_of = {int(c.target.rsplit("_", 1)[1]): c for c in calls}
    for k, (_, kind, names) in enumerate(starts):
        if k not in call_of:        # an empty segment (no prologue nodes, say)
            continue
        sub = getattr(parent, call_of[k].target)
        ins = [p.name for p in sub.graph.find_nodes(op="placeholder")]
        out_node = next(iter(sub.graph.find_nodes(op="output")))
        outs = [a.name for a in out_node.args[0]]
        segments.append(Segment(kind, names, call_of[k].target, ins, outs))
    block_at = {b.name: i for i, b in enumerate(chain.blocks)}
    for seg in segments:
        if seg.kind == "mid":
            prev_first = chain.blocks[block_at[seg.blocks[0]] - 1].first
            carried = [by_name[x] for x in seg.input_names
                       if pos[by_name[x]] >= prev_first and isinstance(example_value(by_name[x]), torch.Tensor)]
            seg.residual_of = _residual_pairs(seg, carried, by_name, pos)
    gate = next(i for i, s in enumerate(segments) if s.kind == "fn")
    g = segments[gate]
    hidden_in = g.input_names.index(chain.hidden_in.name)
    pairs = _residual_pairs(g, [by_name[x] for x in g.input_names if by_name[x] in chain.carried_in[0]], by_name, pos)
    if hidden_in not in pairs:
        raise NoBlockChain(f"the first {Fn} block(s) return no tensor shaped like the hidden states "
                           f"'{chain.hidden_in.name}' they take")
    hidden_out = pairs.index(hidden_in)
    values = {nd.name: example_value(nd) for nd in nodes}
    return SplitPlan(parent, segments, gate, hidden_in, hidden_out, values)


def _residual_pairs(seg: Segment, carried: list[fx.Node], by_name: dict, pos: dict) -> list[int | None]:
    """For each output of ``seg``, the input index it is a residual of (or None).

    Carried inputs are ordered by their first use, outputs by their first use
    after the segment: blocks read hidden and encoder states in a starts order,
    which settles the pairing when both have the same shape.
    """
    first_use = lambda nd: min((pos[u] for u in nd.users), default=len(pos))
    carried = sorted(carried, key=first_use)
    outs = [by_name[x] for x in seg.output_names]
    order = sorted(range(len(outs)), key=lambda i: first_use(outs[i]))
    ranked = pair_residuals(carried, [outs[i] for i in order])
    residual_of: list[int | None] = [None] * len(outs)
    for rank, i in enumerate(order):
        j = ranked[rank]
        residual_of[i] = None if j is None else seg.input_names.index(carried[j].name)
    return residual_of
