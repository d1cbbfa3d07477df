"""Cut the graph into [prologue |] Fn | middle | Bn | epilogue segments (the prologue runs in
the Fn segment where the hidden states' shape is static)."""
from __future__ import annotations

import bisect
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..plan import Segment, SplitPlan
from .chain import BlockChain, NoBlockChain
from .inputs import example_value, is_module_state, static_tensor
from .roles import same_layout, trace_skip_paths


def _pieces(chain: BlockChain, Fn: int, Bn: int, always: set[int], per_block: bool) -> list[tuple[str, int, int]]:
    n = len(chain.blocks)

    def role(b: int) -> str:
        if b < Fn:
            return "fn"
        if b >= n - Bn:
            return "bn"
        return "always" if b in always else "mid"
    pieces: list[list] = []
    for b in range(n):
        if (pieces and pieces[-1][0] == role(b) and b not in chain.stretch_starts
                and not (per_block and role(b) == "mid")):
            pieces[-1][2] = b
        else:
            pieces.append([role(b), b, b])
    return [tuple(p) for p in pieces]


def _begin(chain: BlockChain, b: int) -> int:
    """Graph position where block ``b``'s segment starts: glue between two
    same-shaped stretches travels with the block after it."""
    blocks = chain.blocks
    return blocks[b].first if (b == 0 or b in chain.stretch_starts) else blocks[b - 1].last + 1


def _starts(chain: BlockChain, Fn: int, Bn: int, always: set[int],
            per_block: bool, merge_prologue: bool) -> list[tuple[int, str, list[str]]]:
    """(start position, kind, block names) of each segment, in graph order. With
    ``merge_prologue`` the Fn segment starts at the top of the graph."""
    blocks = chain.blocks
    # with Fn = 0 (TeaCache) the prologue is the gate's segment: kind "fn", no blocks
    starts: list[tuple[int, str, list[str]]] = [] if merge_prologue else [(0, "prologue" if Fn else "fn", [])]
    for kind, s, e in _pieces(chain, Fn, Bn, always, per_block):
        if s in chain.stretch_starts and blocks[s - 1].last + 1 < blocks[s].first:
            starts.append((blocks[s - 1].last + 1, "glue", []))
        starts.append((0 if not starts else _begin(chain, s), kind, [b.name for b in blocks[s:e + 1]]))
    starts.append((blocks[-1].last + 1, "epilogue", []))
    return starts


def _carried(used: list[fx.Node], since: int, pos: dict) -> list[fx.Node]:
    """The tensors among ``used`` made at or after position ``since``: what the previous block handed on."""
    return [a for a in used if pos[a] >= since and isinstance(example_value(a), torch.Tensor)
            and not (a.op == "placeholder" and is_module_state(a))]


def _roles(nodes: list[fx.Node], pos: dict, begin: int, end: int, inputs: list[fx.Node],
           outputs: list[fx.Node], since: int) -> tuple[list[int | None], list[str]]:
    """For a run of nodes ``[begin, end]``: per output, the index in ``inputs`` of the
    carried input it continues (or None), and the outputs that are shaped like a
    carried input but continue none (their role is not proven)."""
    carried = _carried(inputs, since, pos)
    sources = trace_skip_paths(nodes[begin:end + 1], carried, outputs)
    residual_of = [None if s is None else inputs.index(s) for s in sources]
    unproven = [o.name for o, s in zip(outputs, sources) if s is None and any(same_layout(o, c) for c in carried)]
    return residual_of, unproven


def _run_io(nodes: list[fx.Node], pos: dict, begin: int, end: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """Inputs (made before ``begin``) and outputs (used after ``end``) of the nodes ``[begin, end]``."""
    inside = nodes[begin:end + 1]
    inputs = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if pos[a] < begin))
    outputs = [n for n in inside if any(pos[u] > end for u in n.users)]
    return inputs, outputs


def split_chain(gm: fx.GraphModule, chain: BlockChain, Fn: int, Bn: int, granularity: str = "stretch",
                gate_node: Optional[str] = None) -> SplitPlan:
    """Split ``gm`` around the chain.

    Expects ``Fn >= 0``, ``Bn >= 0`` and ``Fn + Bn`` below the chain length. With
    ``Fn = 0`` the prologue is the gate's segment (kind "fn", no blocks) and
    ``gate_node`` names the node in it that the gate measures (TeaCache's modulated
    input, ``passes.modulated``); by default the gate measures the hidden states.
    Guarantees: the parent graph calls one submodule per segment, in order,
    each returning a tuple; every block belongs to exactly one fn/mid/always/bn
    segment; a mid segment never crosses a stretch boundary, and with
    ``granularity="block"`` holds exactly one block. Every output of a
    mid segment shaped like one of its carried inputs continues one of them,
    proven by data flow (``passes.roles``); blocks where that cannot be proven
    go to "always" segments, which run on every step, and are listed in
    ``unproven``. Raises ``NoBlockChain`` when no middle block is left, or when
    the first Fn blocks' hidden-state output cannot be proven.
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
    unproven: dict[str, list[str]] = {}

    def since(b: int) -> int:   # where the tensors block b takes from the previous block are made
        return blocks[b - 1].first if b > 0 else 0

    for b in range(Fn, n - Bn):   # each candidate middle block on its own
        begin, end = _begin(chain, b), blocks[b].last
        _, missing = _roles(nodes, pos, begin, end, *_run_io(nodes, pos, begin, end), since(b))
        if missing:
            unproven[blocks[b].name] = missing
    by_name = {nd.name: nd for nd in nodes}
    # the prologue runs in the gate's segment (one compiled call less per call) where the hidden
    # states' shape is static: the gate then knows it without reading a segment input. Not where
    # the prologue reads a Python number back from a tensor (``dynamic=True`` hands norm eps and
    # RoPE theta over as tensors read with ``.item()``): a segment handed the number as an input
    # compiles it as a symbol, one that reads it inside cannot use it (data-dependent)
    merge = Fn > 0 and static_tensor(example_value(chain.hidden_in)) and not any(
        isinstance(example_value(nd), (torch.SymInt, torch.SymFloat, torch.SymBool))
        for nd in nodes[:blocks[0].first])
    while True:   # a run of proven blocks is proven too, unless glue between them breaks the path
        always = {b for b in range(n) if blocks[b].name in unproven}
        starts = _starts(chain, Fn, Bn, always, granularity == "block", merge)
        parent, segments, spans = _split(gm, starts, pos)
        if not any(s.kind == "mid" for s in segments):
            raise NoBlockChain("no middle block returns outputs whose roles are proven by data flow ("
                               + "; ".join(f"{b}: {', '.join(o)}" for b, o in unproven.items()) + ")")
        grown = False
        for seg, (begin, end) in zip(segments, spans):
            if seg.kind == "mid":
                first = next(i for i, b in enumerate(blocks) if b.name == seg.blocks[0])
                seg.residual_of, missing = _roles(
                    nodes, pos, begin, end, [by_name[x] for x in seg.input_names],
                    [by_name[x] for x in seg.output_names], since(first))
                if missing:
                    unproven.update({b: missing for b in seg.blocks})
                    grown = True
        if not grown:
            break
    gate = next(i for i, s in enumerate(segments) if s.kind == "fn")
    g = segments[gate]
    end = spans[gate][1]
    values = {nd.name: example_value(nd) for nd in nodes}
    if Fn == 0:   # the gate's segment hands the hidden states to block 0 as they are (or a graph input does)
        name = chain.hidden_in.name
        hidden_out = g.output_names.index(name) if name in g.output_names else None
        probe = _follow_hidden(segments, gate, name)
        return SplitPlan(parent, segments, gate, gate_node or name, hidden_out, values, unproven, probe)
    sources = trace_skip_paths(nodes[blocks[0].first:end + 1], list(chain.carried_in[0]),
                               [by_name[x] for x in g.output_names])
    outs = [i for i, src in enumerate(sources) if src is chain.hidden_in]
    if not outs:
        raise NoBlockChain(f"no output of the first {Fn} block(s) continues the hidden states "
                           f"'{chain.hidden_in.name}' along a residual path (adds, casts, cat and slices)")
    handed_on = set(chain.carried_in[Fn])   # the stream the next block reads, over skip values kept for later
    hidden_out = next((i for i in outs if by_name[g.output_names[i]] in handed_on), outs[0])
    probe = _follow_hidden(segments, gate, g.output_names[hidden_out])
    return SplitPlan(parent, segments, gate, gate_node or chain.hidden_in.name, hidden_out, values, unproven, probe)


def _follow_hidden(segments: list[Segment], gate: int, hidden: str) -> list[int]:
    """Mark each middle segment's hidden-state input and output, following the stream
    from the gate's output along the residual pairings; return the run of middle
    segments right after the gate that the stream passes through unbroken."""
    probe, unbroken = [], True
    for k in range(gate + 1, len(segments)):
        seg = segments[k]
        if seg.kind != "mid" or hidden not in seg.input_names:
            unbroken = False
            continue
        j = seg.input_names.index(hidden)
        if j not in seg.residual_of:
            unbroken = False
            continue
        seg.hidden_in, seg.hidden_out = j, seg.residual_of.index(j)
        hidden = seg.output_names[seg.hidden_out]
        if unbroken:
            probe.append(k)
    return probe


def _split(gm: fx.GraphModule, starts: list[tuple[int, str, list[str]]], pos: dict):
    """``split_module`` at the start positions; the segments and their ``[begin, end]`` positions."""
    bounds = [p for p, _, _ in starts]

    def partition(node: fx.Node) -> int:
        return bisect.bisect_right(bounds, pos[node]) - 1

    parent, pieces = split_by(gm, partition)
    segments, spans = [], []
    for k, (begin, kind, names) in enumerate(starts):
        if k not in pieces:        # an empty segment (no prologue nodes, say)
            continue
        module_name, ins, outs = pieces[k]
        segments.append(Segment(kind, names, module_name, ins, outs))
        spans.append((begin, (starts[k + 1][0] if k + 1 < len(starts) else len(pos)) - 1))
    return parent, segments, spans


def split_by(gm: fx.GraphModule, partition) -> tuple[fx.GraphModule, dict[int, tuple[str, list, list]]]:
    """``split_module`` by ``partition(node) -> int``, keeping node names and order; the parent and,
    per partition that has nodes, its (submodule name, input names, output names)."""
    parent = split_module(gm, None, partition, keep_original_order=True,
                          keep_original_node_name=True, tuple_return=True)
    pieces = {}
    for call in parent.graph.find_nodes(op="call_module"):
        sub = getattr(parent, call.target)
        out_node = next(iter(sub.graph.find_nodes(op="output")))
        pieces[int(call.target.rsplit("_", 1)[1])] = (
            call.target, [p.name for p in sub.graph.find_nodes(op="placeholder")], [a.name for a in out_node.args[0]])
    return parent, pieces
