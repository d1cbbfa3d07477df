"""The backend on tiny random-weight diffusers DiTs: discovery, numerics, generations, recompiles.

The reference for cached steps is independent of cachec's graph rewrite: the
eager model runs with forward hooks that capture the output of block Fn-1 and,
on a cached step, replace the output of the last middle block with
``captured Fn output + residual stored at the last computed step``.
"""
import pytest
import torch

import cachec
from tiny_models import MODEL_NAMES, build

REQUIRED = ["flux", "sd3", "wan", "pixart", "cogvideox", "qwenimage"]
# dynamo graph-breaks inside every block of these (DESIGN.md section 2): no graph holds a whole loop
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


def _carried(args, kwargs):
    return [v for v in list(args) + list(kwargs.values()) if torch.is_tensor(v)]


def reference_denoise(case, ts, segments, computed, branches=("cond",)):
    """Eager model + hooks applying the DBCache rule with cachec's decisions.

    For each middle segment (from the summary), a pre-hook on its first block
    captures the tensors it takes; on a cached step a hook on its last block
    replaces each output by the same-shaped captured input + stored residual.
    """
    ctx = {"calls": 0, "branch": None, "step": 0}
    handles = []

    def add_hooks(k, first, last):
        def take_inputs(mod, args, kwargs):
            ctx[("in", k)] = _carried(args, kwargs)

        def replace_outputs(mod, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            ins = ctx[("in", k)]
            pairs = []
            for o in outs:
                j = next((j for j, x in enumerate(ins) if torch.is_tensor(o) and x.shape == o.shape and j not in pairs), None)
                pairs.append(j)
            key = ("res", k, ctx["branch"])
            if ctx["step"] in computed[ctx["branch"]]:
                ctx[key] = [o if j is None else o - ins[j] for o, j in zip(outs, pairs)]
                return None
            new = tuple(r if j is None else ins[j] + r for r, j in zip(ctx[key], pairs))
            return new if isinstance(out, tuple) else new[0]

        handles.append(first.register_forward_pre_hook(take_inputs, with_kwargs=True))
        handles.append(last.register_forward_hook(replace_outputs))

    for k, (kind, blocks) in enumerate(segments):
        if kind == "mid":
            add_hooks(k, case.model.get_submodule(blocks[0]), case.model.get_submodule(blocks[-1]))

    def hooked(**kw):
        ctx["branch"] = branches[ctx["calls"] % len(branches)]
        ctx["step"] = ctx["calls"] // len(branches)
        ctx["calls"] += 1
        return case.model(**kw)
    try:
        return denoise(hooked, case, ts, branches=branches)
    finally:
        for h in handles:
            h.remove()


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
    opts = dict(residual_diff_threshold=0.999, max_warmup_steps=2, max_continuous_cached_steps=2)
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
    want = reference_denoise(case, ts, s.segments, runs[0][1], branches)
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
