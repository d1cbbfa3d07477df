"""Residuals, and the gate's relative L1, fused into the segments' own graphs.

``fuse_gate_diff`` (the Fn segment):

The gate needs, after the first blocks, their residual ``R = out - in`` (kept
when the step computes) and ``sum|R_prev - R| / sum|R_prev|``. Done apart from
the Fn segment that is three passes over memory after it: the Fn output is
read again to subtract, the residual is written, and read again with the
stored one for the diff. Added to the Fn graph, the compiler fuses them into
the code that produces the output: the residual is written once and the
stored one read once.

Measured on CPU (bench/kernels.py's gate rows: 2 shared cores, torch 2.13,
inductor; Fn stood in by FLUX's gated residual add ``x + gate * attn``): what
the gate costs on top of the Fn code, separate (eager subtract + compiled
reference diff) against fused, medians of 20 calls, two runs each:
    bf16 1024 x 3072    0.79 ms   against 0.45 ms
    bf16 4096 x 3072    3.3-3.6 ms against 2.1-2.4 ms
    fp32 4096 x 3072   20.6-20.9 ms against 19.2-19.5 ms
Fused is kept on every device. On CUDA the separate path would call the
Triton ``relative_l1`` kernel for the diff, but the subtract pass and the
re-read of the residual stay, which no stand-alone diff kernel removes; the
GPU rows of bench/kernels.py compare the two when a GPU is at hand.

Precision: inductor takes the residual from the Fn output before rounding it
to the model dtype (one ulp of the output from eager's ``out - in``); the
eager inner backend gives exactly ``out - in``.

``fuse_residuals`` (middle segments): a computed step returns, besides its
outputs, the residuals it stores, written by the same code. Measured the same
way (bf16 1 x 4096 x 3072, medians of 20-40 calls, repeated runs): on top of
the segment, eager subtraction against fused
    stand-in x + gate * attn               1.5-2.3 ms against 0.45-0.7 ms
    FLUX single-block style (cat, then a
    strided view; two paired outputs)      2.0-2.6 ms against 2.3-3.9 ms
                                           (a tie within the noise)
and a tie in fp32 (18.4-18.8 ms both, page faults of fresh 50 MB buffers).
Fused is kept: never slower beyond the noise, one mechanism with the gate.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..kernels.relative_l1 import relative_l1_reference

__all__ = ["fuse_gate_diff", "fuse_residuals"]


def _residual(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return (out - inp).contiguous()


def _output(graph: fx.Graph) -> fx.Node:
    return next(iter(graph.find_nodes(op="output")))


def fuse_residuals(mid: fx.GraphModule, residual_of: list) -> fx.GraphModule:
    """A copy of a middle segment that also returns, after its outputs, the
    residual ``out - in`` (contiguous) of each output paired with an input
    (``residual_of[i]`` is that input's index, or None), in output order.

    What a computed step stores for the cached ones, written by the code that
    writes the outputs instead of by one eager subtraction each.
    """
    graph = copy.deepcopy(mid.graph)
    placeholders, out_node = list(graph.find_nodes(op="placeholder")), _output(graph)
    outs = tuple(out_node.args[0])
    with graph.inserting_before(out_node):
        residuals = tuple(graph.call_function(_residual, (o, placeholders[j]))
                          for o, j in zip(outs, residual_of) if j is not None)
    out_node.args = (outs + residuals,)
    graph.lint()
    return fx.GraphModule(mid, graph)


def fuse_gate_diff(fn: fx.GraphModule, hidden_in: int, hidden_out: int) -> fx.GraphModule:
    """A copy of the Fn segment that takes the stored residual as one more input
    and returns its outputs followed by ``residual`` and ``relative_l1`` (0-d fp32).

    ``prev`` must be contiguous and shaped like the hidden states; where there
    is none yet, any such tensor (zeros) gives a diff the caller ignores.
    """
    n_outs = len(_output(fn.graph).args[0])
    gm = fuse_residuals(fn, [hidden_in if i == hidden_out else None for i in range(n_outs)])
    graph, out_node = gm.graph, _output(gm.graph)
    outs = tuple(out_node.args[0])
    with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):
        prev = graph.placeholder("cachec_prev_residual")
    with graph.inserting_before(out_node):
        diff = graph.call_function(relative_l1_reference, (prev, outs[-1]))
    out_node.args = (outs + (diff,),)
    graph.lint()
    gm.recompile()
    return gm
