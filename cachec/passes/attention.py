"""Attention outputs as regions: find them in the blocks and cut the graph around them (PAB).

Pyramid Attention Broadcast reuses attention outputs across steps. The region of one
attention is found by data flow, never by class names:

* **its core**: a ``scaled_dot_product_attention`` call inside a chain block, and what
  follows it only to reshape, cast, slice or project it: views, transposes, casts,
  slices and splits, dropout, and the first linear on each path (the output projection);
* **what only it needs**: walking back from the core, every node of the block whose
  users all lie in the region (the q/k/v projections, their norms and rotary
  embedding, the modulated norm that feeds only the attention).

The region's outputs (the nodes it hands to the rest of the block) are reused as values
on a broadcast step. An attention is **cross** attention where its keys do not depend
on anything the block takes from the previous block (they come from the text
embedding); **temporal** where it is self-attention over a batch larger than the
smallest self-attention batch of the chain (the image tokens folded into the batch:
it attends across frames); **self** attention otherwise (spatial, full 3-D and joint
text-image attention included).

``split_attention`` cuts the graph into ``fn | mid | always | mid | ... | epilogue``: each
region a "mid" segment, everything else in the "always" segment after the last region it
depends on (so before every region that depends on it). The first segment is the gate's.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..plan import Segment, SplitPlan
from .chain import BlockChain, NoBlockChain, _reachable
from .inputs import example_value, reads_scalar
from .split import split_by

__all__ = ["AttentionRegion", "find_attention_regions", "split_attention", "split_heads"]

_PASS_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "to", "type",
                 "type_as", "float", "half", "bfloat16", "split", "chunk", "narrow", "squeeze", "unsqueeze",
                 "__getitem__", "split_with_sizes"}
_PASS_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.split,
                   torch.chunk, torch.narrow, torch.squeeze, torch.unsqueeze, operator.getitem,
                   torch.nn.functional.dropout, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.to}
_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}


def _is_sdpa(node: fx.Node) -> bool:
    """Attention as diffusers emits it, or as ``passes.ulysses`` made it."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") in (
        "scaled_dot_product_attention", "ulysses_attention.default")


def _passes_through(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR


@dataclass
class AttentionRegion:
    block: int                 # chain index of the block it lies in
    block_name: str
    kind: str                  # "self" or "cross"
    nodes: set                 # its fx nodes
    # DiTango's head groups: (name of the query node it slices, first head, end head, group index,
    # which attention call of the block it belongs to)
    heads: Optional[tuple] = None

    @property
    def label(self) -> str:
        if self.heads is not None:
            return f"{self.block_name} attention {self.heads[4]} heads {self.heads[1]}-{self.heads[2] - 1}"
        return f"{self.block_name} {self.kind}-attention"


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_kwargs(sdpa: fx.Node) -> dict:
    """The attention call's arguments by name, however it was called."""
    return {**dict(zip(_SDPA_ARGS, sdpa.args)), **sdpa.kwargs}


def _fake(fn, *args, **kwargs):
    """Run ``fn`` on the fake values of fx ``args`` under their fake mode: the new node's value."""
    vals, kw = fx.node.map_arg((args, kwargs), example_value)
    mode = next(v.fake_mode for v in torch.utils._pytree.tree_leaves(vals) if hasattr(v, "fake_mode"))
    with mode:
        return fn(*vals, **kw)


def split_heads(gm: fx.GraphModule, chain: BlockChain, groups: int) -> list[AttentionRegion]:
    """DiTango's regions: each attention call in the chain's blocks becomes one call per group of
    heads (``q[:, h0:h1]`` against the same heads of k and v, the mask sliced where it has a head
    dimension) whose outputs are joined again along the heads; each group's slices and call are a
    region. The group count is the largest divisor of the head count up to ``groups``. Attention
    with fewer key heads than query heads (grouped-query) stays one group."""
    regions: list[AttentionRegion] = []
    graph = gm.graph
    for b, block in enumerate(chain.blocks):
        block_nodes = [n for n in graph.nodes if _in_block(n, block.name)]
        for ordinal, sdpa in enumerate([n for n in block_nodes if _is_sdpa(n)]):
            named = _sdpa_kwargs(sdpa)
            q, k, v = (named.get(n) for n in _SDPA_ARGS[:3])
            qv, kv, vv = (example_value(x) if isinstance(x, fx.Node) else None for x in (q, k, v))
            if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (qv, kv, vv)):
                continue
            heads = qv.shape[1]
            if not isinstance(heads, int) or kv.shape[1] != heads or vv.shape[1] != heads:
                continue
            g = max(d for d in range(1, min(groups, heads) + 1) if heads % d == 0)
            mask = named.get("attn_mask")
            mv = example_value(mask) if isinstance(mask, fx.Node) else None
            rest = {name: a for name, a in named.items() if name not in _SDPA_ARGS[:4]}
            outs = []
            step = heads // g
            with graph.inserting_before(sdpa):
                for j in range(g):
                    h0, h1 = j * step, (j + 1) * step
                    parts = []
                    for x in (q, k, v) + ((mask,) if isinstance(mv, torch.Tensor) and mv.dim() == 4
                                            and mv.shape[1] == heads else ()):
                        sl = graph.call_function(operator.getitem, (x, (slice(None), slice(h0, h1))))
                        sl.meta = _meta(sdpa, _fake(operator.getitem, x, (slice(None), slice(h0, h1))))
                        parts.append(sl)
                    kwargs = dict(rest)
                    if mask is not None:
                        kwargs["attn_mask"] = parts[3] if len(parts) > 3 else mask
                    call = graph.call_function(torch.nn.functional.scaled_dot_product_attention, tuple(parts[:3]),
                                               kwargs)
                    call.meta = _meta(sdpa, _fake(torch.nn.functional.scaled_dot_product_attention,
                                                  *parts[:3], **kwargs))
                    outs.append(call)
                    regions.append(AttentionRegion(b, block.name, "self", set(parts) | {call},
                                                   (q.name, h0, h1, j, ordinal)))
                joined = graph.call_function(torch.cat, (outs,), {"dim": 1})
                joined.meta = _meta(sdpa, _fake(torch.cat, outs, dim=1))
            sdpa.replace_all_uses_with(joined)
            graph.erase_node(sdpa)
    graph.lint()
    gm.recompile()
    return regions


def _meta(like: fx.Node, value) -> dict:
    meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
    meta["example_value"] = value
    meta["val"] = value
    return meta


def _in_block(node: fx.Node, name: str) -> bool:
    from .loops import outermost_item
    item = outermost_item(node)
    return item is not None and f"{item[0]}.{item[1]}" == name


def _core(sdpa: fx.Node, inside: set) -> set:
    """The attention call and what follows it only to reshape, cast, slice or project it."""
    core, todo = {sdpa}, [(sdpa, False)]
    while todo:
        node, projected = todo.pop()
        for user in node.users:
            if user in core or user not in inside:
                continue
            if _passes_through(user):
                core.add(user)
                todo.append((user, projected))
            elif _is_linear(user) and not projected and user.args[0] is node:
                core.add(user)
                todo.append((user, True))
    return core


def _grow(core: set, block_nodes: list) -> set:
    """``core`` with every node of the block whose users all lie in the region."""
    region = set(core)
    for node in reversed(block_nodes):
        if node in region or node.op not in ("call_function", "call_method", "call_module") or reads_scalar(node):
            continue   # a number read from a tensor stays outside: the region takes it as an input
        if node.users and all(u in region for u in node.users):
            region.add(node)
    return region


def find_attention_regions(gm: fx.GraphModule, chain: BlockChain) -> list[AttentionRegion]:
    """Every attention region of the chain's blocks, in graph order (module docstring)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    regions: list[AttentionRegion] = []
    batch: dict[int, object] = {}
    for b, block in enumerate(chain.blocks):
        block_nodes = nodes[block.first:block.last + 1]
        inside = set(block_nodes)
        taken: set = set()
        for sdpa in (n for n in block_nodes if _is_sdpa(n)):
            if sdpa in taken:
                continue
            region = _grow(_core(sdpa, inside), block_nodes) - taken
            taken |= region
            key = _sdpa_kwargs(sdpa).get("key")
            # what the block takes from the previous block (block 0: the hidden states; its other
            # inputs that block 1 does not read, such as the text states, carry nothing from a block)
            carried = set(chain.carried_in[b]) if b else {chain.hidden_in}
            # keys reached from none of them, walking back within the block
            cross = isinstance(key, fx.Node) and not carried & _reachable(
                key, lambda n: [a for a in n.all_input_nodes if pos[a] >= block.first or a in carried])
            regions.append(AttentionRegion(b, block.name, "cross" if cross else "self", region))
            batch[len(regions) - 1] = _batch(sdpa)
    # temporal attention: self-attention whose batch folds in more than the smallest self-attention
    # batch does (Latte's temporal blocks fold the image tokens into the batch and attend over frames)
    folded = [batch[k] for k, r in enumerate(regions) if r.kind == "self" and isinstance(batch[k], int)]
    for k, r in enumerate(regions):
        if r.kind == "self" and folded and isinstance(batch[k], int) and batch[k] > min(folded):
            r.kind = "temporal"
    return regions


def _batch(sdpa: fx.Node):
    """The attention's batch size (its query's first dimension), or None."""
    q = _sdpa_kwargs(sdpa).get("query")
    value = example_value(q) if isinstance(q, fx.Node) else None
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() == 4 else None


def split_attention(gm: fx.GraphModule, chain: BlockChain, regions: list[AttentionRegion]) -> SplitPlan:
    """Cut ``gm`` around the attention regions (module docstring). Raises ``NoBlockChain``
    where there is none. Guarantees: region k is segment 2k + 1 when no segment is empty;
    each non-region node runs in the first segment after every region it depends on."""
    if not regions:
        raise NoBlockChain("no scaled_dot_product_attention call inside the chain's blocks")
    nodes = list(gm.graph.nodes)
    region_of = {n: k for k, r in enumerate(regions) for n in r.nodes}
    for n in nodes:   # an item of a tuple (chunk, split) runs where the tuple is made: no tuple crosses segments
        if (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                and isinstance(example_value(n.args[0]), (tuple, list))):
            if n.args[0] in region_of:
                region_of[n] = region_of[n.args[0]]
            else:
                region_of.pop(n, None)
    after: dict[fx.Node, int] = {}        # node -> the last region it depends on (-1: none)
    for n in nodes:
        if n in region_of:
            after[n] = region_of[n]
        else:
            after[n] = max((after[a] for a in n.all_input_nodes), default=-1)
    for n, k in region_of.items():        # a region reads only what runs before it
        bad = [a for a in n.all_input_nodes if a not in region_of and after[a] >= k]
        if bad:
            raise NoBlockChain(f"attention region of {regions[k].block_name} reads {bad[0].name}, made after it")

    def partition(node: fx.Node) -> int:
        k = region_of.get(node)
        return 2 * k + 1 if k is not None else 2 * (after[node] + 1)

    parent, pieces = split_by(gm, partition)
    last = max(pieces)
    segments = []
    for p in sorted(pieces):
        module_name, ins, outs = pieces[p]
        if p % 2:
            r = regions[p // 2]
            seg = Segment("mid", [r.block_name], module_name, ins, outs, [None] * len(outs), attention=r.kind,
                          heads=r.heads)
        else:
            kind = "fn" if not segments else ("epilogue" if p == last else "always")
            seg = Segment(kind, [], module_name, ins, outs)
        segments.append(seg)
    if segments[0].kind != "fn":
        raise NoBlockChain("the graph starts inside an attention region")
    values = {n.name: example_value(n) for n in nodes}
    return SplitPlan(parent, segments, 0, chain.hidden_in.name, None, values)
