"""The graph a calibrated cached step runs: block input + predicted residual, in one pass.

A calibrator (TaylorSeer, FoCa: ``runtime.calibrators``) predicts a cached
residual as a linear combination of tensors it stored on computed steps, with
coefficients it works out on the host. The cached output is
``base + sum_k coefs[k] * terms[k]``, accumulated in fp32 and written once,
in place, into a buffer laid out as the computed output was (the next compiled
segment asserts its input strides). The coefficients are an input, so a new
step distance never recompiles. Calibrators that need the prediction itself
later (FoCa's recursion) get it back with ``keep=True``.

Why compiled rather than eager adds or a Triton op: inductor writes the strided
buffer directly, runs on CPU too, and fuses the sum; bench/results/fusion_cpu.md
has the measurements.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["combination_graph"]


def combination_graph(terms: int, keep: bool = False) -> fx.GraphModule:
    """``(out, base, coefs, *terms) -> ()`` (or ``(prediction,)`` with ``keep``):
    ``out[...] = base + sum_k coefs[k] * terms[k]`` (``plan`` module docstring)."""
    g = fx.Graph()
    out, base, coefs = g.placeholder("out"), g.placeholder("base"), g.placeholder("coefs")
    pred = None
    aten = torch.ops.aten   # aten ops, not method calls: AOTAutograd's cache accepts them

    def f32(x):
        return g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
    for k in range(terms):
        term = f32(g.placeholder(f"term{k}"))
        part = g.call_function(operator.mul, (term, g.call_function(operator.getitem, (coefs, k))))
        pred = part if pred is None else g.call_function(operator.add, (pred, part))
    total = g.call_function(operator.add, (f32(base), pred))
    g.call_function(aten.copy_.default, (out, total))
    g.output((pred,) if keep else ())
    return fx.GraphModule(torch.nn.Module(), g)
