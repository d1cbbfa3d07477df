"""Identical blocks compile once (passes.share): which blocks share a subgraph, and that
the outlined graph computes what the original did, eagerly, through AOTAutograd and
through inductor."""
import copy
import operator

import pytest
import torch
import torch.fx as fx

import cachec
from cachec.passes.inputs import example_value
from cachec.passes.share import SUBGRAPH_PREFIX, no_subgraph_input_asserts, share_blocks
from tiny_models import _tiny_flux_transformer, build


def _dynamo_graph(model, *args, dynamic=False, **kwargs) -> tuple[fx.GraphModule, list]:
    """The graph dynamo hands a backend for ``model(*args, **kwargs)``, with its example inputs."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    assert len(seen) == 1
    return seen[0]


def _subgraph_calls(gm: fx.GraphModule) -> list[str]:
    """The shared subgraph each outlined block calls, in graph order."""
    return [n.args[0].target for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]


class Scale(torch.nn.Module):
    """``h * (1 + scale * w) + w``: ``scale`` is a Python constant, baked into the graph."""

    def __init__(self, scale: float, dim: int = 8):
        super().__init__()
        self.scale = scale
        self.w = torch.nn.Parameter(torch.randn(dim))

    def forward(self, h):
        return h * (1 + self.scale * self.w) + self.w


class Stack(torch.nn.Module):
    def __init__(self, scales):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Scale(s) for s in scales])

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return h.sum(-1)


@pytest.mark.parametrize("scales, expected", [
    ([2.0, 2.0, 2.0, 2.0], ["0", "0", "0", "0"]),
    ([2.0, 2.0, 3.0, 2.0, 3.0], ["0", "0", "1", "0", "1"]),   # a different constant is a different block
    ([2.0, 2.0, 3.0, 2.0], ["0", "0", "0"]),    # the one block of its kind stays inline
    ([2.0, 3.0, 4.0], []),
])
def test_blocks_share_a_subgraph_exactly_when_their_structure_is_equal(scales, expected):
    torch.manual_seed(0)
    model, x = Stack(scales), torch.randn(2, 8)
    gm, ex = _dynamo_graph(model, x)
    want = gm(*ex)
    outlined, distinct = share_blocks(gm)
    assert (outlined, distinct) == (len(expected), len(set(expected)))
    assert _subgraph_calls(gm) == [SUBGRAPH_PREFIX + e for e in expected]
    torch.testing.assert_close(gm(*ex), want, rtol=0, atol=0)


class Modulated(torch.nn.Module):
    """A block that reads a value every block reads alike (``c``, as FLUX blocks read
    ``temb``); with ``in_place`` it scales what it computes from ``c`` in place (through
    a view with ``"view"``)."""

    def __init__(self, in_place=False, dim: int = 8):
        super().__init__()
        self.in_place = in_place
        self.w = torch.nn.Parameter(torch.randn(dim))

    def forward(self, h, c):
        gate = torch.sigmoid(c)
        if self.in_place == "view":
            gate.view(-1).mul_(2.0)
        elif self.in_place:
            gate.mul_(2.0)
        return h * gate * self.w + torch.cos(c)


class ModulatedStack(torch.nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Modulated(in_place) for _ in range(4)])

    def forward(self, h, c):
        for b in self.blocks:
            h = b(h, c)
        return h.sum(-1)


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("in_place", [False, True, "view"])
def test_what_blocks_compute_alike_from_a_shared_input_runs_once_outside(in_place):
    """``sigmoid(c)`` and ``cos(c)`` are the same in every block: they leave the shared
    subgraph and run once in front of the calls, unless a block writes into them."""
    torch.manual_seed(0)
    model, h, c = ModulatedStack(in_place), torch.randn(2, 8), torch.randn(2, 8)
    gm, ex = _dynamo_graph(model, h, c)
    want = gm(*ex)
    assert share_blocks(gm) == (4, 1)
    sub = getattr(gm, SUBGRAPH_PREFIX + "0")
    outside, inside = _targets(gm), _targets(sub)
    assert outside.count(torch.cos) == 1 and torch.cos not in inside
    if in_place:   # a block's own tensor, written in place: computed per block, inside
        assert torch.sigmoid not in outside and inside.count(torch.sigmoid) == 1
    else:
        assert outside.count(torch.sigmoid) == 1 and torch.sigmoid not in inside
    torch.testing.assert_close(gm(*ex), want, rtol=0, atol=0)


def test_tiny_flux_outlined_computes_what_it_did():
    """The tiny FLUX at 3 double + 6 single blocks: the double blocks share one subgraph, each
    subgraph serves two blocks or more; no subgraph returns a view (inductor misplaces those:
    passes.share); eager and AOTAutograd runs of the outlined graph equal the original exactly."""
    case = build("flux")
    gm, ex = _dynamo_graph(_tiny_flux_transformer(3, 6), **case.inputs(0.6))
    want = gm(*ex)
    original = copy.deepcopy(gm)
    outlined, distinct = share_blocks(gm)
    calls = _subgraph_calls(gm)
    assert len(calls) == outlined and outlined >= 7
    assert calls[0] == calls[1] == calls[2] and distinct < outlined
    assert all(calls.count(c) >= 2 for c in calls)
    for name in set(calls):
        out = next(iter(getattr(gm, name).graph.find_nodes(op="output")))
        assert not any(example_value(o)._is_view() for o in out.args[0])
        # silu(temb) ahead of each block's modulation: hoisted out, once for all blocks
        assert torch.nn.functional.silu not in _targets(getattr(gm, name))
    silus = [n for n in gm.graph.nodes if n.target is torch.nn.functional.silu]
    into_calls = [n for n in silus if any(u.target is torch.ops.higher_order.invoke_subgraph for u in n.users)]
    assert len(into_calls) == 1
    torch.testing.assert_close(gm(*ex), want, rtol=0, atol=0)
    aot = torch._dynamo.backends.debugging.aot_eager(gm, ex)
    torch.testing.assert_close(aot(*ex), original(*ex), rtol=0, atol=0)


def test_symbolic_sizes_stay_inline():
    case = build("flux")
    gm, _ = _dynamo_graph(case.model, dynamic=True, **case.inputs(0.6))
    assert share_blocks(gm) == (0, 0)
    assert not _subgraph_calls(gm)


def test_subgraph_assert_switch_is_put_back():
    from torch._inductor.codegen.wrapper import SubgraphPythonWrapperCodegen as Codegen
    before = Codegen.codegen_input_size_and_nan_asserts
    with no_subgraph_input_asserts():
        assert Codegen.codegen_input_size_and_nan_asserts is not before
    assert Codegen.codegen_input_size_and_nan_asserts is before


@pytest.mark.parametrize("value", [1, "yes", None])
def test_share_blocks_option_is_a_bool(value):
    with pytest.raises(ValueError, match="share_blocks"):
        cachec.parse_options({"share_blocks": value})


@pytest.mark.inductor
def test_shared_blocks_through_inductor_match_eager():
    """Tiny FLUX at 3 + 6 blocks, DBCache with computed and cached steps: inductor with
    shared blocks gives what eager gives, step for step, and what inductor with every
    block inline gives; cachec.summary says how many subgraphs the blocks compiled to."""
    model = _tiny_flux_transformer(3, 6)
    case = build("flux")
    ts = torch.linspace(1.0, 0.05, 8).tolist()
    opts = {"Fn_compute_blocks": 1, "max_warmup_steps": 2, "residual_diff_threshold": 0.3}
    outs = {}
    with torch.no_grad():
        for share in (True, False):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="cachec", options={**opts, "share_blocks": share})
            outs[share] = [compiled(**case.inputs(t))[0] for t in ts]
            s = cachec.summary(compiled)
            if share:
                assert 0 < len(s.cached_steps) < len(ts)
                blocks, subgraphs = s.shared_blocks   # of the 8 middle blocks: the Fn block is alone
                assert 2 <= blocks <= 8 and subgraphs < blocks
                assert f"identical blocks compiled once: {blocks} blocks as {subgraphs} compiled" in str(s)
        eager = torch.compile(model, backend="cachec", options={**opts, "inner_backend": "eager"})
        torch._dynamo.reset()
        ref = [eager(**case.inputs(t))[0] for t in ts]
    for a, b, r in zip(outs[True], outs[False], ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


class InPlace(torch.nn.Module):
    """Writes in place: into its input (``on_input``, through a view of it), or into a
    tensor of its own, as Wan's rotary embedding fills ``out[..., 0::2]``."""

    def __init__(self, on_input: bool, dim: int = 8):
        super().__init__()
        self.on_input = on_input
        self.w = torch.nn.Parameter(torch.randn(dim))

    def forward(self, h):
        if self.on_input:
            h[:, :4].add_(self.w[:4])
            return h * 2
        out = torch.empty_like(h)
        out[:, 0::2] = h[:, 0::2] * self.w[0::2]
        out[:, 1::2] = h[:, 1::2] + self.w[1::2]
        return out


class Chain(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, h):
        h = h + 1   # the first block's input is made in the graph, like every other block's
        for b in self.blocks:
            h = b(h)
        return h


@pytest.mark.parametrize("on_input", [True, False])
def test_blocks_that_write_into_their_inputs_stay_inline(on_input):
    torch.manual_seed(0)
    model = Chain([InPlace(on_input) for _ in range(3)])
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x.clone())
    gm, ex = _dynamo_graph(model, x.clone())

    def args():   # a fresh input each run: the blocks write into their tensors
        return [a if isinstance(a, torch.nn.Parameter) else x.clone() for a in ex]
    assert share_blocks(gm) == ((0, 0) if on_input else (3, 1))
    torch.testing.assert_close(gm(*args())[0], want, rtol=0, atol=0)
    torch.testing.assert_close(torch._dynamo.backends.debugging.aot_eager(gm, ex)(*args())[0], want,
                               rtol=0, atol=0)


def test_a_segment_that_fails_to_compile_outlined_compiles_inline(monkeypatch):
    """An inner compiler that cannot take the outlined graph: cachec warns once per
    segment, compiles it inline, and the outputs are the eager ones."""
    import cachec.backend as backend
    compiled_graphs = []

    def picky(gm, example_inputs, **kw):
        if any(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes):
            raise RuntimeError("no subgraphs here")
        compiled_graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(backend, "lookup_backend", lambda name: picky)
    case = build("flux")
    ts = torch.linspace(1.0, 0.1, 3).tolist()
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={"Fn_compute_blocks": 1})
    with torch.no_grad(), pytest.warns(cachec.CachecWarning, match="compiling identical blocks once failed"):
        outs = [compiled(**case.inputs(t))[0] for t in ts]
    with torch.no_grad():
        ref = [case.model(**case.inputs(t))[0] for t in ts]
    for a, r in zip(outs, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert compiled_graphs and cachec.summary(compiled).shared_blocks == (0, 0)


@pytest.mark.inductor
@pytest.mark.parametrize("name", ["wan", "sd3"])
def test_deeper_tiny_models_share_blocks_through_inductor(name):
    """Five blocks of a tiny Wan (its rotary embedding writes into a tensor of its own) and of
    a tiny SD3: the middle blocks compile as one subgraph, and inductor gives what eager gives."""
    case = build(name)
    config = dict(case.model.config)
    config["num_layers"] = 5
    torch.manual_seed(0)
    model = type(case.model).from_config(config).eval()
    ts = [1.0, 0.6]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cachec", options={"residual_diff_threshold": 0.0, "Fn_compute_blocks": 1})
    with torch.no_grad():
        got = [compiled(**case.inputs(t))[0] for t in ts]
        want = [model(**case.inputs(t))[0] for t in ts]
    assert cachec.summary(compiled).shared_blocks[1] == 1 and cachec.summary(compiled).shared_blocks[0] >= 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
