"""Dynamic shapes keep caching: ``dynamic=True`` or ``mark_dynamic`` on the latent.

With ``dynamic=True`` dynamo hands FLUX's graph over with its Python floats (norm eps,
RoPE theta) as inputs read back with ``.item()``; cachec used to fail on them and
fall back to plain graphs. The reference is ``reference.HookedDBCache`` (its own
decisions, residuals by argument names); a new resolution in the same compiled
graph is a new generation whose decisions and outputs are the reference's on a
fresh model state.
"""
import pytest
import torch

import cachec
from reference import HookedDBCache
from tiny_models import _image_ids, build

OPTS = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.6, max_warmup_steps=1,
            max_continuous_cached_steps=-1)
TS = torch.linspace(1.0, 0.2, 6).tolist()


def flux_inputs(case, side: int, t: float):
    """FLUX inputs for a side x side packed latent."""
    kw = case.inputs(t)
    kw.update(hidden_states=torch.randn(1, side * side, 16, generator=torch.Generator().manual_seed(side)),
              img_ids=_image_ids(side, side))
    return kw


def denoise(model, case, side, hooks=None, mark=False):
    outs = []
    with torch.no_grad():
        for i, t in enumerate(TS):
            kw = flux_inputs(case, side, t)
            if mark:   # the latent's token count; FLUX's RoPE ties the image ids' length to it
                torch._dynamo.mark_dynamic(kw["hidden_states"], 1)
                torch._dynamo.mark_dynamic(kw["img_ids"], 0)
            if hooks is not None:
                hooks.step(i, "cond")
            outs.append(model(**kw)[0])
    return outs


def reference(case, blocks, side):
    hooks = HookedDBCache(case.model, blocks, 1, 1, OPTS["residual_diff_threshold"], OPTS["max_warmup_steps"])
    try:
        return denoise(case.model, case, side, hooks), hooks.computed["cond"]
    finally:
        hooks.remove()


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_shapes_cache_as_static_and_a_new_resolution_starts_afresh(how):
    case = build("flux")
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", dynamic=True if how == "dynamic=True" else None,
                             options={"inner_backend": "aot_eager", "strict": True, **OPTS})
    mark = how == "mark_dynamic"
    for gen, side in enumerate([8, 6, 4]):
        if gen == 2:   # by now the graph is symbolic in the token count: nothing compiles again
            with torch.compiler.set_stance("fail_on_recompile"):
                got = denoise(compiled, case, side, mark=mark)
        else:
            got = denoise(compiled, case, side, mark=mark)
        s = cachec.summary(compiled)
        want, computed = reference(case, s.blocks, side)
        assert (s.generation, s.steps) == (gen, len(TS)) and s.computed_steps == computed and s.cached_steps
        for step, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{side}x{side} step {step}: {m}")


def test_the_plan_adds_no_guard_on_symbolic_sizes():
    """With dynamic=True one graph serves every resolution: the passes compare SymInt shapes
    without guarding them (sorting the carried shapes once guarded the token count between
    9 and 128, and 4 or 144 tokens then compiled again)."""
    from torch._dynamo.utils import counters
    case = build("flux")
    compiled = torch.compile(case.model, backend="cachec", dynamic=True, options={"inner_backend": "eager", **OPTS})
    with torch.no_grad():
        compiled(**flux_inputs(case, 3, 1.0))   # 9 tokens: no other size of the model (16 would be the channels')
        graphs = counters["stats"]["unique_graphs"]
        for side in (2, 12, 5):
            compiled(**flux_inputs(case, side, 1.0))
    assert counters["stats"]["unique_graphs"] == graphs


def test_dynamic_graph_with_static_hidden_states_compiles_through_aot():
    """dynamic=True at 4x4 = 16 tokens, as many as the latent has channels: dynamo's duck
    sizing ties the token count to the weights' static 16, so the hidden states come out
    static, while norm eps and RoPE theta still arrive as tensors read with ``.item()``
    before block 0. The Fn segment must take those numbers as inputs: with the prologue
    inside it, AOTAutograd failed on them (data-dependent) and dynamo fell back to eager."""
    case = build("flux")
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", dynamic=True, fullgraph=True,
                             options={"inner_backend": "aot_eager", "strict": True, **OPTS})
    got = denoise(compiled, case, 4)
    s = cachec.summary(compiled)
    want, computed = reference(case, s.blocks, 4)
    assert s.segments[0][0] == "prologue" and s.computed_steps == computed and s.cached_steps
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_float_dynamo_already_made_constant_is_folded_before_the_split():
    """On a warm start with dynamic=True, dynamo handed FLUX's graph over with norm eps still
    read back with ``.item()`` although its value was already a constant ``SymFloat``. A
    segment's example inputs are fakes of another mode, so that read failed inside the Fn
    segment (data-dependent) and dynamo fell back with a graph break. The backend now puts
    the number in place of the read; the reference is ``layer_norm`` at that eps."""
    import operator
    import sympy
    import torch.fx as fx
    from torch.fx.experimental.sym_node import SymNode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from cachec.backend import _specialize_float_inputs
    graph, env = fx.Graph(), ShapeEnv()
    x, eps, count = graph.placeholder("x"), graph.placeholder("eps"), graph.placeholder("count")
    read = graph.call_method("item", (eps,))
    read.meta["example_value"] = torch.SymFloat(SymNode(sympy.Float(1e-2), env, float, hint=1e-2))
    times = graph.call_method("item", (count,))
    times.meta["example_value"] = torch.SymInt(SymNode(sympy.Integer(3), env, int, hint=3))
    normed = graph.call_function(torch.nn.functional.layer_norm, (x, (4,), None, None), {"eps": read})
    graph.output(graph.call_function(operator.mul, (normed, times)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    _specialize_float_inputs(gm)
    assert not [n for n in gm.graph.nodes if n.op == "call_method"]
    x = torch.randn(3, 4) * 0.05
    want = torch.nn.functional.layer_norm(x, (4,), eps=1e-2) * 3
    torch.testing.assert_close(gm(x, torch.tensor(1e-2, dtype=torch.float64), torch.tensor(3)), want)
    # the constants, not the inputs
    torch.testing.assert_close(gm(x, torch.tensor(0.5, dtype=torch.float64), torch.tensor(7)), want)
