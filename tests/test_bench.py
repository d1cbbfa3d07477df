"""bench/e2e.py counts recompiles and graph breaks for its table: the counter against known cases."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import e2e  # noqa: E402


def test_compile_counter_counts_recompiles_and_graph_breaks():
    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    compiled = torch.compile(f, backend="eager", dynamic=False)
    with e2e.CompileCounter() as counter:
        for n in (3, 4, 5):          # each new size recompiles f and the resume function after the break
            compiled(torch.randn(n))
        compiled(torch.randn(5))     # cached: nothing new
    assert counter.recompiles == 4
    assert counter.graph_breaks == 3
