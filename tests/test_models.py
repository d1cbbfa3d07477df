"""The backend on tiny random-weight diffusers DiTs: discovery, numerics, generations, recompiles.

The reference for cached steps is independent of cachec's graph rewrite and of
its decisions: the eager model under forward hooks that measure the first
blocks' residual, decide by cache-dit's rules and reuse the middle's residuals
by the names the blocks take (``reference.HookedDBCache``).
"""
import pytest
import torch

import cachec
from reference import HookedDBCache
from tiny_models import MODEL_NAMES, build

REQUIRED = ["flux", "sd3", "wan", "pixart", "cogvideox", "qwenimage"]
# dynamo graph-breaks inside every block of these (docs/design.md, "The passes"): no graph holds a whole loop
BREAK_IN_EVERY_BLOCK = {"mochi": "aten.nonzero", "hidream": "aten.bincount"}
CHAINED = [n for n in MODEL_NAMES if n not in BREAK_IN_EVERY_BLOCK]
STEPS = 6


def compile_case(case, **options):
    torch._dynamo.reset()
    return torch.compile(case.model, backend="cachec", options={"inner_backend": "eager", **options})


def denoise(model, case, ts, *, branches=("cond",), seed=0, batch=1):
    """Euler loop; one call per branch per step. Returns the model outputs per step and branch."""
    x = case.inputs(ts[0], seed=seed, batch=batch)[case.latent_key]
    outs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            step = {}
            for b in branches:
                step[b] = case.latent_of(model(**case.with_latent(case.inputs(t, branch=b, batch=batch), x)))
            outs.append(step)
            dt = (ts[i + 1] if i + 1 < len(ts) else 0.0) - t
            x = x + dt * step[branches[0]]
    return outs


def reference_denoise(case, ts, summary, threshold, warmup, max_continuous, branches=("cond",)):
    """The eager model under ``reference.HookedDBCache``, laid out as cachec's plan (its middle
    runs), deciding by itself. Returns the outputs and the steps it computed per branch."""
    hooks = HookedDBCache.like(case.model, summary, threshold, warmup, max_continuous)
    ctx = {"calls": 0}

    def hooked(**kw):
        hooks.step(ctx["calls"] // len(branches), branches[ctx["calls"] % len(branches)])
        ctx["calls"] += 1
        return case.model(**kw)
    try:
        return denoise(hooked, case, ts, branches=branches), hooks.computed
    finally:
        hooks.remove()


def assert_outputs_close(got, want, atol):
    for s, (g, w) in enumerate(zip(got, want)):
        for b in w:
            torch.testing.assert_close(g[b], w[b], rtol=atol, atol=atol, msg=lambda m: f"step {s} {b}: {m}")


@pytest.fixture(params=CHAINED)
def case(request):
    return build(request.param)


def test_threshold_zero_matches_eager(case):
    compiled = compile_case(case, residual_diff_threshold=0.0, max_warmup_steps=1)
    ts = torch.linspace(1.0, 0.1, STEPS).tolist()
    got = denoise(compiled, case, ts)
    s = cachec.summary(compiled)
    assert s.computed_steps == list(range(STEPS))
    assert len(s.blocks) >= 2
    hint = set(getattr(case.model, "_repeated_blocks", []) or [])
    if hint:
        classes = {type(case.model.get_submodule(b)).__name__ for b in s.blocks}
        assert classes <= hint, f"chained {classes}, the model lists {hint}"
    assert_outputs_close(got, denoise(case.model, case, ts), 1e-5)


@pytest.mark.parametrize("rising", [False, True])
def test_cached_steps_generations_and_recompiles(case, rising):
    check_cached_generations(case, rising)


def check_cached_generations(case, rising):
    """Separate CFG, three generations without refresh, zero recompiles, hand-checked outputs."""
    threshold, warmup, max_continuous = 0.999, 2, 2
    opts = dict(residual_diff_threshold=threshold, max_warmup_steps=warmup, max_continuous_cached_steps=max_continuous)
    ts = torch.linspace(1.0, 0.1, STEPS).tolist()
    ts = ts[::-1] if rising else ts
    branches = ("cond", "uncond")
    compiled = compile_case(case, **opts)
    with torch.no_grad():   # the first call compiles
        compiled(**case.inputs(ts[0], seed=7))
    cachec.refresh(compiled)
    runs = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            outs = denoise(compiled, case, ts, branches=branches)
            s = cachec.summary(compiled)
            runs.append((outs, {n: b.computed_steps for n, b in s.branches.items()},
                         {n: b.residual_diffs for n, b in s.branches.items()}))
    assert s.steps == STEPS and s.calls == 2 * STEPS and list(s.branches) == list(branches)
    assert s.cached_steps, "threshold 0.999 should cache some steps on this model"
    for outs, computed, diffs in runs[1:]:
        assert computed == runs[0][1] and diffs == runs[0][2]
        assert_outputs_close(outs, runs[0][0], 0)
    fresh = compile_case(case, **opts)
    assert_outputs_close(denoise(fresh, case, ts, branches=branches), runs[0][0], 0)
    want, computed = reference_denoise(case, ts, s, threshold, warmup, max_continuous, branches)
    assert computed == runs[0][1]
    assert_outputs_close(runs[0][0], want, 1e-4)


@pytest.mark.parametrize("name", REQUIRED)
def test_required_models_are_covered(name):
    assert name in CHAINED


@pytest.mark.parametrize("name", sorted(BREAK_IN_EVERY_BLOCK))
def test_break_in_every_block_runs_plainly_with_one_warning_naming_the_break(name):
    case = build(name)
    compiled = compile_case(case)
    ts = torch.linspace(1.0, 0.1, 3).tolist()
    with pytest.warns(cachec.CachecWarning) as record:
        got = denoise(compiled, case, ts)
    messages = [str(w.message) for w in record if issubclass(w.category, cachec.CachecWarning)]
    assert len(messages) == 1, messages
    assert BREAK_IN_EVERY_BLOCK[name] in messages[0] and "fullgraph=True" in messages[0]
    assert_outputs_close(got, denoise(case.model, case, ts), 1e-5)


def test_capturing_dynamic_shape_ops_lets_mochi_cache():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        check_cached_generations(build("mochi"), rising=False)
