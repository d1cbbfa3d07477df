"""Segments with their residuals, and the gate's relative L1, fused in (passes.residuals)."""
import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings, strategies as st

import cachec
from cachec.passes.residuals import fuse_gate_signals, fuse_residuals
from cachec.plan import probe_sums
from toy import ToyDiT, fn_residual

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class JointBlock(torch.nn.Module):
    """Like FLUX's single blocks: the hidden output is a strided view of a joint sequence."""

    def forward(self, txt, x, attn, gate):
        joint = torch.cat([txt, x + gate * attn], dim=1)
        return joint[:, :txt.shape[1]] * 2, joint[:, txt.shape[1]:]


def inputs(tokens: int, dim: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return [r(2, 3, dim), r(2, tokens, dim), r(2, tokens, dim), r(2, 1, dim)], r(2, tokens, dim)


def rel_l1(prev, cur):
    """The gate's diff restated in float64: sum|prev - cur| / sum|prev|."""
    p, c = prev.double(), cur.double()
    return float((p - c).abs().sum() / p.abs().sum())


@settings(max_examples=20, deadline=None)
@given(tokens=st.sampled_from([1, 127, 4097]), dim=st.sampled_from([8, 64]), dtype=st.sampled_from(DTYPES))
def test_fused_graph_returns_the_outputs_the_residual_and_its_relative_l1(tokens, dim, dtype):
    gm = fx.symbolic_trace(JointBlock())
    args, prev = inputs(tokens, dim, dtype)
    fused = fuse_gate_signals(gm, hidden_in="x", hidden_out=1, signal="residual")
    *outs, residual, sums = fused(*args, prev)
    want = gm(*args)
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
    assert not want[1].is_contiguous() and residual.is_contiguous()
    torch.testing.assert_close(residual, want[1] - args[1], rtol=0, atol=0)
    assert sums.dtype == torch.float32 and sums.shape == (1, 2)   # partial sums, not a ratio
    assert float(sums[0, 0]) == pytest.approx(float((prev.double() - residual.double()).abs().sum()), rel=1e-5)
    assert float(sums[0, 0] / sums[0, 1]) == pytest.approx(rel_l1(prev, residual), rel=1e-5)


class WithPrologue(torch.nn.Module):
    """A prologue that makes the hidden states inside the graph, then the joint block."""

    def __init__(self):
        super().__init__()
        self.block = JointBlock()

    def forward(self, txt, latent, attn, gate):
        x = latent * 3 - 1
        return self.block(txt, x, attn, gate)


def test_gate_residual_starts_from_hidden_states_made_inside_the_segment():
    """The prologue merged into the Fn segment: the residual is taken from the node that
    makes the hidden states, not from an input."""
    gm = fx.symbolic_trace(WithPrologue())
    start = next(n.name for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "sub")
    args, prev = inputs(9, 8, torch.float32)
    *outs, residual, sums = fuse_gate_signals(gm, hidden_in=start, hidden_out=1, signal="residual")(*args, prev)
    torch.testing.assert_close(residual, outs[1] - (args[1] * 3 - 1), rtol=0, atol=0)
    assert float(sums[0, 0] / sums[0, 1]) == pytest.approx(rel_l1(prev, residual), rel=1e-5)


@settings(max_examples=10, deadline=None)
@given(tokens=st.sampled_from([1, 127]), dtype=st.sampled_from(DTYPES),
       residual_of=st.sampled_from([[0, 1], [None, 1], [0, None], [None, None]]))
def test_fused_middle_returns_its_outputs_then_the_residual_of_each_paired_one(tokens, dtype, residual_of):
    gm = fx.symbolic_trace(JointBlock())
    args, _ = inputs(tokens, 8, dtype)
    *got, = fuse_residuals(gm, residual_of)(*args)
    want = gm(*args)
    paired = [(w, args[j]) for w, j in zip(want, residual_of) if j is not None]
    assert len(got) == len(want) + len(paired)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for r, (w, x) in zip(got[len(want):], paired):
        assert r.is_contiguous()
        torch.testing.assert_close(r, w - x, rtol=0, atol=0)


@pytest.mark.inductor
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_graph_through_inductor_matches_the_eager_gate(dtype, device):
    """Inductor takes the residual from the output before rounding it to dtype: one ulp of the output."""
    gm = fx.symbolic_trace(JointBlock())
    args, prev = inputs(127, 64, dtype, device=device)
    fused = fuse_gate_signals(gm, hidden_in="x", hidden_out=1, signal="residual")
    torch._dynamo.reset()
    *outs, residual, sums = torch.compile(fused, backend="inductor", dynamic=False)(*args, prev)
    diff = sums[0, 0] / sums[0, 1]
    want = gm(*args)
    ulp = torch.finfo(dtype).eps * float(want[1].abs().max())
    for o, w in zip(outs, want):   # eager rounds gate * attn before adding
        torch.testing.assert_close(o, w, rtol=0, atol=2 * ulp)
    torch.testing.assert_close(residual, want[1] - args[1], rtol=0, atol=ulp)
    assert float(diff) == pytest.approx(rel_l1(prev, want[1] - args[1]), rel=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.inductor
def test_residualss_through_inductor_are_the_relative_l1_of_the_fn_residual():
    """The toy's Fn residual is w0 * (temb(t) + x / 10): the recorded diffs are known by hand."""
    torch._dynamo.reset()
    model = ToyDiT(4)
    compiled = torch.compile(model, backend="cachec", options={
        "residual_diff_threshold": 0.5, "max_warmup_steps": 1, "max_continuous_cached_steps": -1})
    ts, x = torch.linspace(1.0, 0.05, 6).tolist(), torch.randn(1, 3, 8)
    with torch.no_grad():
        for t in ts:
            compiled(x, torch.tensor([t]))
    s = cachec.summary(compiled)
    last = 0
    assert s.computed_steps[0] == 0 and len(s.residual_diffs) == len(ts) - 1
    for step in range(1, len(ts)):
        want = rel_l1(fn_residual(model, x, ts[last]), fn_residual(model, x, ts[step]))
        assert s.residual_diffs[step] == pytest.approx(want, rel=1e-5)
        if step in s.computed_steps:
            last = step


@settings(max_examples=10, deadline=None)
@given(blocks=st.integers(0, 4), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 100))
def test_fused_probe_returns_each_blocks_input_change_along_the_reuse_trajectory(blocks, dtype, seed):
    """Row i compares block i's stored input with x + residual_0 + ... + residual_{i-1},
    restated here in float64 block by block."""
    gm = fx.symbolic_trace(JointBlock())
    args, _ = inputs(9, 8, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pairs = [torch.randn(2, 9, 8, generator=g).to(dtype) for _ in range(2 * blocks)]
    *outs, sums = fuse_gate_signals(gm, hidden_in="x", hidden_out=1, signal="probe", probes=blocks)(*args, *pairs)
    want = gm(*args)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
    assert sums.shape == (blocks, 2) and sums.dtype == torch.float32
    x = want[1].double()
    for i in range(blocks):
        stored, residual = pairs[2 * i].double(), pairs[2 * i + 1].double()
        assert float(sums[i, 0]) == pytest.approx(float((stored - x).abs().sum()), rel=1e-4)
        assert float(sums[i, 1]) == pytest.approx(float(stored.abs().sum()), rel=1e-4)
        x = x + residual
    torch.testing.assert_close(probe_sums(want[1], *pairs), sums)


def _dynamo_graph(module, *args, dynamic: bool = False) -> fx.GraphModule:
    """The graph dynamo hands a backend, with its example values (symbolic sizes with ``dynamic``)."""
    seen = []
    torch._dynamo.reset()
    torch.compile(module, backend=lambda gm, ex: seen.append(gm) or gm.forward, dynamic=dynamic or None)(*args)
    return seen[0]


def _ordered(gm: fx.GraphModule, args: list) -> list:
    """``args`` (txt, x, attn, gate) in the order of ``gm``'s inputs, dynamo's own; a symbolic
    size input (``dynamic=True``) gets the size of the argument dimension it stands for."""
    by_name = dict(zip(("L_txt_", "L_x_", "L_attn_", "L_gate_"), args))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    tensors = [(p.meta["example_value"], by_name[p.target]) for p in placeholders if p.target in by_name]

    def size(sym):
        return next(int(t.shape[i]) for v, t in tensors for i, d in enumerate(v.shape)
                    if isinstance(d, torch.SymInt) and d.node.expr == sym.node.expr)
    return [by_name[p.target] if p.target in by_name else size(p.meta["example_value"]) for p in placeholders]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("signal", ["residual", "probe", "modulated", "snapshot", "none", "mid"])
def test_fused_ops_are_ones_aotautograds_cache_accepts(signal, dynamic):
    """What the passes add to a dynamo graph are aten ops, not calls of Python functions:
    AOTAutograd's cache would bypass a graph with those and trace every piece again on each
    warm start. The fused graph still computes what the eager one does; with
    ``dynamic=True`` at a second token count too (the ops hold no size)."""
    from torch._functorch._aot_autograd.autograd_cache import check_node_safe
    args, prev = inputs(5, 8, torch.float32)
    gm = _dynamo_graph(JointBlock(), *args, dynamic=dynamic)
    ordered = _ordered(gm, args)
    hidden_in = next(p.name for p in gm.graph.find_nodes(op="placeholder") if p.target == "L_x_")
    if signal == "mid":
        x_index = next(i for i, a in enumerate(ordered) if a is args[1])
        fused = fuse_residuals(gm, [None, x_index])
    else:
        fused = fuse_gate_signals(gm, hidden_in, 1, signal, probes=2)
    for node in fused.graph.nodes:
        check_node_safe(node)   # raises BypassAOTAutogradCache on a node it cannot hash

    def row(p, c):
        return torch.stack([(p - c).abs().sum(), p.abs().sum()])
    for tokens in (5, 7) if dynamic else (5,):
        args, prev = inputs(tokens, 8, torch.float32, seed=tokens)
        extra = {"residual": [prev], "modulated": [args[1]], "probe": [prev, prev, prev, prev]}.get(signal, [])
        outs, x = list(JointBlock()(*args)), args[1]
        empty = torch.zeros(0, 2)
        want = {"residual": outs + [outs[1] - x, row(prev, outs[1] - x)[None]],
                "modulated": outs + [x, row(x, x)[None]],
                "snapshot": outs + [x, empty],
                "none": outs + [empty],
                "probe": outs + [torch.stack([row(prev, outs[1]), row(prev, outs[1] + prev)])],
                "mid": outs + [outs[1] - x]}[signal]
        got = fused(*_ordered(gm, args), *extra)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            if g.dim() == 3 and w is not outs[0] and w is not outs[1]:
                assert g.is_contiguous()   # residuals and copies: what the gate and the store rely on


def test_a_function_whose_ops_hold_a_size_stays_one_call_under_symbolic_sizes():
    """Under ``dynamic=True`` ``_call`` adds a function's aten ops only where tracing it at two
    sizes gives the same graph; ``new_zeros(tokens)`` bakes the token count into the graph, so
    it stays one call of the function, which computes at any size (``reshape(-1)`` traces to
    ``view(t, [-1])``, which holds no size, and goes in as that op)."""
    from cachec.passes.residuals import _call

    def per_token(t):
        return t.new_zeros(t.shape[1])
    args, _ = inputs(5, 8, torch.float32)
    gm = _dynamo_graph(JointBlock(), *args, dynamic=True)
    x = next(p for p in gm.graph.find_nodes(op="placeholder") if p.target == "L_x_")
    out = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(out):
        zeros_node = _call(gm.graph, per_token, x)
        flat_node = _call(gm.graph, lambda t: t.reshape(-1), x)
    assert zeros_node.op == "call_function" and zeros_node.target is per_token
    assert flat_node.target is torch.ops.aten.view.default and flat_node.args[1] == [-1]


@pytest.mark.parametrize("keep", [False, True])
def test_combination_graph_is_one_aotautograds_cache_accepts(keep):
    """The calibrated cached step's graph (passes.calibrate): aten ops only, and it writes
    ``base + sum_k coefs[k] * terms[k]`` into a strided ``out`` in place."""
    from torch._functorch._aot_autograd.autograd_cache import check_node_safe
    from cachec.passes.calibrate import combination_graph
    gm = combination_graph(2, keep)
    for node in gm.graph.nodes:
        check_node_safe(node)
    g = torch.Generator().manual_seed(0)
    base, t0, t1 = (torch.randn(2, 4, 3, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty(2, 3, 4, dtype=torch.bfloat16).transpose(1, 2)   # strided, as a computed output can be
    coefs = torch.tensor([0.5, -2.0])
    pred = gm(out, base, coefs, t0, t1)
    want = base.float() + 0.5 * t0.float() - 2.0 * t1.float()
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)
    if keep:
        torch.testing.assert_close(pred[0], 0.5 * t0.float() - 2.0 * t1.float(), rtol=0, atol=0)
