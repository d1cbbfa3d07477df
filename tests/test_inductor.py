"""End to end through inductor (slow: marked so it can be deselected with -m 'not inductor')."""
import pytest
import torch

import cachec
from test_models import denoise
from tiny_models import build

pytestmark = pytest.mark.inductor


def test_flux_inductor_segments_match_plain_compile_and_never_recompile():
    """Batch 2: FLUX's single blocks return a strided view, and inductor checks input strides."""
    case = build("flux")
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    plain = torch.compile(case.model, backend="inductor")
    want = denoise(plain, case, ts, batch=2)
    torch._dynamo.reset()
    exact = torch.compile(case.model, backend="cachec", options={"residual_diff_threshold": 0.0})
    got = denoise(exact, case, ts, batch=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["cond"], w["cond"], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cached = torch.compile(case.model, backend="cachec",
                           options={"residual_diff_threshold": 0.999, "max_warmup_steps": 2})
    first = denoise(cached, case, ts, batch=2)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = denoise(cached, case, ts, batch=2)
    s = cachec.summary(cached)
    assert s.computed_steps == [0, 1, 5] and s.cached_steps == [2, 3, 4, 6, 7]
    for a, b in zip(first, second):
        torch.testing.assert_close(a["cond"], b["cond"], rtol=0, atol=0)


def test_flux_taylorseer_through_inductor_matches_its_eager_segments():
    """TaylorSeer's cached-step graph writes FLUX's strided single-block output; inductor's
    segments must give what the same graphs give run eagerly, under one fixed step mask."""
    case = build("flux")
    ts = torch.linspace(1.0, 0.1, 10).tolist()
    # derivatives are taken from step 3 on: steps 3 and 4 give order 2 its table
    cfg = {"steps_computation_mask": [1, 1, 1, 1, 1, 0, 0, 1, 0, 1], "steps_computation_policy": "static",
           "enable_taylorseer": True, "taylorseer_order": 2}
    runs = {}
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(case.model, backend="cachec", options={**cfg, "inner_backend": inner})
        runs[inner] = denoise(compiled, case, ts, batch=2)
        assert cachec.summary(compiled).cached_steps == [5, 6, 8]
    for step, (g, w) in enumerate(zip(runs["inductor"], runs["eager"])):
        torch.testing.assert_close(g["cond"], w["cond"], rtol=1e-4, atol=1e-4, msg=f"step {step}")
    # the extrapolation is not the plain reuse: the cached steps differ from a reuse-only run
    torch._dynamo.reset()
    reuse = torch.compile(case.model, backend="cachec", options={k: v for k, v in cfg.items() if "taylor" not in k})
    plain = denoise(reuse, case, ts, batch=2)
    assert not torch.allclose(plain[6]["cond"], runs["inductor"][6]["cond"], rtol=1e-4, atol=1e-4)


def test_inductor_options_reach_every_compiled_piece(monkeypatch):
    """``options={"inductor": {...}}`` patches inductor's config for every piece cachec compiles
    (segments, the gate, regions, TaylorSeer's combination graph): each inductor compile sees
    epilogue_fusion off (its default is on), and the outputs still equal the eager segments'."""
    import torch._inductor.compile_fx as cfx
    from test_schedule import SHAPE, falling, run_generation
    from toy import ToyDiT
    assert torch._inductor.config.epilogue_fusion
    real, seen = cfx.compile_fx, []

    def recording(gm, example_inputs, **kw):
        if "inner_compile" in kw:   # compile_fx calling itself with the patches applied
            return real(gm, example_inputs, **kw)

        def inner(*args, **kwargs):
            seen.append(torch._inductor.config.epilogue_fusion)
            return cfx.compile_fx_inner(*args, **kwargs)
        return real(gm, example_inputs, inner_compile=inner, **kw)
    monkeypatch.setattr(cfx, "compile_fx", recording)
    # compile every piece anew: a cache hit (of an earlier test's graphs) skips inductor's inner compile
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    cfg = {"residual_diff_threshold": 1.0, "max_warmup_steps": 4, "max_continuous_cached_steps": 2,
           "enable_taylorseer": True}
    ts, x = falling(8), [torch.randn(SHAPE)]
    outs = {}
    for inner_backend in ("eager", "inductor"):
        torch._dynamo.reset()
        extra = {"inductor": {"epilogue_fusion": False}} if inner_backend == "inductor" else {}
        compiled = torch.compile(ToyDiT(4), backend="cachec", options={**cfg, "inner_backend": inner_backend, **extra})
        outs[inner_backend] = run_generation(compiled, ts, x)
    s = cachec.summary(compiled)
    assert s.cached_steps and len(seen) >= len(s.segments) + 1 and not any(seen)
    for a, b in zip(outs["inductor"], outs["eager"]):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
