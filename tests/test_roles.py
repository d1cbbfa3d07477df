"""Residual roles by data flow: each cached output continues the input its skip path comes from.

On FLUX with as many text tokens as image tokens, hidden and encoder states
have one shape: only the data flow tells them apart. The reference
(``reference.HookedDBCache``) stores and reuses residuals by the names the
blocks are called with, and takes its decisions itself.
"""
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings, strategies as st

import cachec
from cachec.passes.roles import trace_skip_paths
from reference import HookedDBCache
from tiny_models import build

STEPS = 10


def flux_equal_tokens():
    """Tiny FLUX whose text has as many tokens (64) as the image."""
    case = build("flux")

    def inputs(t, seed):
        g = torch.Generator().manual_seed(seed)
        kw = case.inputs(t)
        kw.update(hidden_states=torch.randn(1, 64, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 64, 32, generator=g), txt_ids=torch.zeros(64, 3))
        return kw
    return case.model, inputs


def denoise(model, inputs, hooks=None):
    ts = torch.linspace(1.0, 0.1, STEPS).tolist()
    outs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            if hooks is not None:
                hooks.step(i, "cond")
            outs.append(model(**inputs(t, seed=0))[0])
    return outs


@pytest.mark.parametrize("threshold", [1.0, 0.3])
def test_equal_text_and_image_tokens_keep_their_roles(threshold):
    model, inputs = flux_equal_tokens()
    opts = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=threshold,
                max_warmup_steps=2, max_continuous_cached_steps=2)
    compiled = torch.compile(model, backend="cachec", options={"inner_backend": "eager", **opts})
    got = denoise(compiled, inputs)
    s = cachec.summary(compiled)
    hooks = HookedDBCache(model, s.blocks, 1, 1, threshold, 2, 2)
    try:
        want = denoise(model, inputs, hooks)
    finally:
        hooks.remove()
    assert s.computed_steps == hooks.computed["cond"] and s.cached_steps
    if threshold == 1.0:
        assert s.computed_steps == [0, 1, 4, 7]
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


# -- the pass itself, on small graphs built by hand -----------------------------------


def _graph(build_body) -> tuple[fx.GraphModule, list, list]:
    """A graph with two (4, 6) inputs a and b; ``build_body`` returns its outputs."""
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    for p in (a, b):
        p.meta["example_value"] = torch.empty(4, 6)
    outs = build_body(g, a, b)
    g.output(tuple(outs))
    gm = fx.GraphModule(torch.nn.Module(), g)
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(torch.randn(4, 6), torch.randn(4, 6))
    for n in gm.graph.nodes:
        if n.op == "call_function" or n.op == "call_method":
            n.meta["example_value"] = torch.empty(n.meta["tensor_meta"].shape)
    return gm, [a, b], outs


@settings(max_examples=40, deadline=None)
@given(swap_cat=st.booleans(), swap_out=st.booleans(), swap_add=st.booleans(), cast=st.booleans())
def test_joined_then_sliced_streams_are_traced_back_to_their_inputs(swap_cat, swap_out, swap_add, cast):
    """FLUX single-block style: cat the two streams, add an update to the joint sequence,
    slice them back, in any order: each slice continues the input it was cut from."""
    def body(g, a, b):
        first, second = (b, a) if swap_cat else (a, b)
        joint = g.call_function(torch.cat, ([first, second],), {"dim": 0})
        update = g.call_function(torch.tanh, (g.call_function(operator.mul, (joint, 0.5)),))
        operands = (update, joint) if swap_add else (joint, update)
        joint = g.call_function(operator.add, operands)
        if cast:
            joint = g.call_method("to", (joint, torch.float32))
        head = g.call_function(operator.getitem, (joint, (slice(None, 4), slice(None))))
        tail = g.call_function(operator.getitem, (joint, (slice(4, None), slice(None))))
        return [tail, head] if swap_out else [head, tail]
    gm, (a, b), outs = _graph(body)
    roles = trace_skip_paths(list(gm.graph.nodes), [a, b], outs)
    head_src, tail_src = (b, a) if swap_cat else (a, b)
    assert roles == ([tail_src, head_src] if swap_out else [head_src, tail_src])


def test_attention_mixing_both_streams_proves_nothing():
    """``h + f(h, e)`` continues h even though the update reads e; a post-norm
    ``norm(h + f)`` continues nothing; an output made from both skip paths neither."""
    def body(g, a, b):
        mixed = g.call_function(torch.tanh, (g.call_function(operator.add, (a, b)),))
        h = g.call_function(operator.add, (a, mixed))
        normed = g.call_function(torch.nn.functional.layer_norm, (h, (6,)))
        both = g.call_function(operator.add, (a, b))
        return [h, normed, both]
    gm, (a, b), outs = _graph(body)
    assert trace_skip_paths(list(gm.graph.nodes), [a, b], outs) == [a, None, None]


def test_a_side_input_added_between_blocks_is_not_a_source():
    """A ControlNet residual ``b`` added to the hidden states is an update, not the stream;
    had ``b`` been carried too, ``a + b`` would continue neither."""
    def body(g, a, b):
        return [g.call_function(operator.add, (g.call_function(operator.add, (a, 1.0)), b))]
    gm, (a, b), outs = _graph(body)
    assert trace_skip_paths(list(gm.graph.nodes), [a], outs) == [a]
    assert trace_skip_paths(list(gm.graph.nodes), [a, b], outs) == [None]


# -- blocks whose roles cannot be proven -------------------------------------------------


class PostNormBlock(torch.nn.Module):
    """Two streams of one shape, each renormalised after its update: no skip path survives."""

    def __init__(self, post_norm: bool):
        super().__init__()
        self.post_norm = post_norm
        self.f = torch.nn.Linear(8, 8)
        self.g = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        h = hidden_states + torch.tanh(self.f(hidden_states + encoder_hidden_states) + temb)
        e = encoder_hidden_states + torch.tanh(self.g(h) + temb)
        if self.post_norm:
            h = torch.nn.functional.layer_norm(h, (8,))
        return e, h


class PostNormDiT(torch.nn.Module):
    def __init__(self, post_norm_at: set):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(1.0, 3.0, 8))
        self.blocks = torch.nn.ModuleList([PostNormBlock(i in post_norm_at) for i in range(5)])

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        temb = torch.sin(timestep[:, None, None] * self.freqs)
        h, e = hidden_states, encoder_hidden_states
        for block in self.blocks:
            e, h = block(h, e, temb)
        return (h,)


def _run_post_norm(options, post_norm_at):
    torch.manual_seed(0)
    model = PostNormDiT(post_norm_at).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cachec", options={
        "inner_backend": "eager", "residual_diff_threshold": 1.0, "max_warmup_steps": 1, **options})
    x, e = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    with torch.no_grad():
        for t in torch.linspace(1.0, 0.1, 4).tolist():
            compiled(x, torch.tensor([t]), e)
    return cachec.summary(compiled)


def test_blocks_of_unproven_roles_always_run_and_the_warning_names_the_tensor():
    with pytest.warns(cachec.CachecWarning, match=r"blocks\.2 returns 'h_\d+'") as record:
        s = _run_post_norm({}, {2})
    assert sum(issubclass(w.category, cachec.CachecWarning) for w in record) == 1
    assert [(k, b) for k, b in s.segments if b] == [
        ("fn", ["blocks.0"]), ("mid", ["blocks.1"]), ("always", ["blocks.2"]), ("mid", ["blocks.3", "blocks.4"])]
    assert list(s.unproven) == ["blocks.2"] and "always runs: blocks.2" in str(s)
    assert s.cached_steps == [1, 2, 3]


def test_strict_raises_on_an_unproven_role():
    with pytest.raises(Exception, match=r"cannot prove .* \(strict=True\)"):
        _run_post_norm({"strict": True}, {3})


def test_outputs_with_no_input_to_pair_are_listed():
    """cache-dit's pattern 4: the encoder states are made from the hidden states in each
    block (a different shape), reused as values on cached steps."""
    from test_patterns import pattern_case
    case = pattern_case(4)
    compiled = torch.compile(case.model, backend="cachec", options={"inner_backend": "eager",
                                                                      "residual_diff_threshold": 1.0})
    with torch.no_grad():
        for t in (1.0, 0.5):
            compiled(**case.inputs(t))
    s = cachec.summary(compiled)
    assert len(s.unpaired) == 1 and "reused as values" in str(s)
