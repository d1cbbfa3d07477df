"""FX passes: find the chain of transformer blocks and cut the graph around it.

The passes run in this order (see ``plan_graph``):

1. ``find_graph_inputs``   latent input, timestep candidates, module state
2. ``find_block_loops``    runs of same-class items of one ModuleList
3. ``find_block_chain``    the loops the latent tokens flow through, with the
                           tensors each block carries and the stretches where
                           their shapes stay the same
4. ``split_chain``         [prologue |] Fn | middle | Bn | epilogue segments,
                           with the residual pairing of each gated segment

then the backend runs ``fuse_gate_signals`` on the Fn segment (the gate's
signals, as partial sums, compile into the Fn code) and ``fuse_residuals`` on
each middle segment (the residuals a computed step stores, likewise). The
conventions of what each compiled piece returns live in ``cachec.plan``.
"""
from .inputs import GraphInputs, find_graph_inputs, reads_back
from .loops import Block, BlockLoop, find_block_loops
from .chain import BlockChain, find_block_chain, NoBlockChain
from ..plan import Segment, SplitPlan
from .split import split_chain
from .residuals import fuse_gate_signals, fuse_residuals
from .modulated import copy_before_chain, find_modulated_input
from .attention import find_attention_regions, split_attention, split_heads

__all__ = [
    "GraphInputs", "find_graph_inputs", "Block", "BlockLoop", "find_block_loops",
    "BlockChain", "find_block_chain", "NoBlockChain", "Segment", "SplitPlan", "split_chain",
    "plan_graph", "fuse_gate_signals", "fuse_residuals",
]


def plan_graph(gm, Fn: int, Bn: int, granularity: str = "stretch", signal: str = "residual", head_groups: int = 1):
    """Run the passes in order; raise ``NoBlockChain`` when the graph has no chain.

    ``granularity`` is what the strategy gates: "stretch" (the middle in as few
    regions as the chain allows), "block" (one region per middle block), "attention"
    (one region per attention output, ``passes.attention``) or "heads" (one per group of
    ``head_groups`` heads of each attention call).
    ``signal="modulated"`` (TeaCache) first copies block 0's modulated input in front
    of the chain (``passes.modulated``), where the gate measures it; where the graph
    has none, the gate measures the hidden states entering block 0 and the returned
    ``fallback`` says why. Returns ``(inputs, chain, plan, (measured, fallback))``,
    ``measured`` naming the node the gate measures (TeaCache only)."""
    inputs = find_graph_inputs(gm)
    loops = find_block_loops(gm)
    chain = find_block_chain(gm, loops, inputs)
    if granularity in ("attention", "heads") and any(
            reads_back(n) for n in gm.graph.nodes):
        raise NoBlockChain(
            "this graph reads Python numbers back from tensors (with dynamic=True dynamo hands norm eps over as "
            "tensors read with .item()), and attention regions cannot be cut around those reads; "
            "torch.compile(..., dynamic=True, fullgraph=True) makes dynamo fold them into constants")
    if granularity == "attention":   # PAB: attention outputs are the regions
        return inputs, chain, split_attention(gm, chain, find_attention_regions(gm, chain)), (None, None)
    if granularity == "heads":       # DiTango: each group of heads of each attention is a region
        return inputs, chain, split_attention(gm, chain, split_heads(gm, chain, head_groups)), (None, None)
    gate_node, fallback, measured = None, None, None
    if signal == "modulated":
        node = find_modulated_input(gm, chain, inputs)
        if node is None:
            fallback = ("no adaptive norm output in the first block (a normalized hidden state scaled or "
                        "shifted by a timestep-only value)" if inputs.timestep_candidates
                        else "the timestep is not an input of the graph that holds the blocks")
        else:
            try:
                gate_node = copy_before_chain(gm, chain, node)
            except ValueError as e:
                fallback = f"its modulated input {node.name} cannot be computed before the chain ({e})"
            else:   # the copies shifted the blocks' positions
                measured = f"{chain.blocks[0].name}'s {node.name}"
                chain = find_block_chain(gm, find_block_loops(gm), inputs)
        if fallback:
            measured = f"the hidden states entering {chain.blocks[0].name} ({chain.hidden_in.name})"
            gate_node = copy_before_chain(gm, chain, chain.hidden_in)
            chain = find_block_chain(gm, find_block_loops(gm), inputs)
    return inputs, chain, split_chain(gm, chain, Fn, Bn, granularity, gate_node), (measured, fallback)
