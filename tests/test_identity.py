"""Call identity: every transformer call lands in the right (generation, step, branch).

The references are hand-worked schedules: with ``residual_diff_threshold=1``,
``max_warmup_steps=2`` and ``max_continuous_cached_steps=2`` every branch of a
10-step generation computes steps [0, 1, 4, 7] and caches the rest, and the
outputs are the toy's eager DBCache (``toy.reference_outputs``) for those
steps, per branch. Branches get inputs 50x apart and each generation new
ones, and the toy's residuals depend on them: a residual reused across
branches, generations or roles changes the output.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cachec
from test_schedule import SHAPE, check_outputs, compile_toy

OPTS = dict(residual_diff_threshold=1.0, max_warmup_steps=2, max_continuous_cached_steps=2)
N = 10
WANT = [0, 1, 4, 7]   # N steps with OPTS, by hand
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
SHAPES = ["()", "(1,)", "(B,)", "(B, 1)", "(B, tokens)"]


def timestep(value: float, dtype, shape: str) -> torch.Tensor:
    """A timestep as pipelines pass it; the per-token one is 0 on the first token (a
    conditioning frame, as Wan 2.2 TI2V passes it) and ``value`` elsewhere."""
    v = torch.tensor(value).to(dtype)
    if shape == "()":
        return v
    if shape in ("(1,)", "(B,)"):
        return v.reshape(1)
    if shape == "(B, 1)":
        return v.reshape(1, 1)
    per_token = v.repeat(1, SHAPE[1])
    per_token[:, 0] = 0
    return per_token


def schedule(dtype, shape: str, rising: bool, n: int = N) -> list:
    """n distinct timesteps in the dtype: flow-matching (0..1) for floats, 0..999 for ints."""
    hi, lo = (999.0, 50.0) if not dtype.is_floating_point else (1.0, 0.05)
    values = torch.linspace(hi, lo, n)
    if not dtype.is_floating_point:
        values = values.round()
    ts = [timestep(float(v), dtype, shape) for v in values]
    assert len({float(t.float().max()) for t in ts}) == n, "the test needs distinct timesteps"
    return ts[::-1] if rising else ts


def run(compiled, ts, xs, names=None, step_index=True):
    """One generation: per step one call per branch (input ``xs[b]``); with ``names``,
    each call inside ``cache_context(names[b], ...)`` as diffusers pipelines do."""
    outs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            step = []
            for b, x in enumerate(xs):
                if names is None:
                    step.append(compiled(x, t)[0])
                    continue
                fields = {"step_index": i, "num_inference_steps": len(ts)} if step_index else {}
                with compiled.cache_context(names[b], **fields):
                    step.append(compiled(x, t)[0])
            outs.append(step)
    return outs


def inputs(branches: int) -> list:
    return [torch.randn(SHAPE) * 50 ** b for b in range(branches)]


def check_generation(model, compiled, outs, ts, xs, names, generation):
    s = cachec.summary(compiled)
    assert (s.generation, s.steps, s.calls) == (generation, len(ts), len(ts) * len(xs))
    assert list(s.branches) == names
    for b, name in enumerate(names):
        assert s.branches[name].computed_steps == WANT, (generation, name)
        check_outputs(model, outs, ts, xs, WANT, branch=b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), shape=st.sampled_from(SHAPES), rising=st.booleans(),
       branches=st.sampled_from([1, 2]))
def test_unnamed_calls_of_any_timestep_dtype_and_shape(dtype, shape, rising, branches):
    """Three generations back to back, no refresh, no step count: the timestep alone
    tells steps, CFG branches (the call's place in its step) and generations apart."""
    model, compiled = compile_toy(**OPTS)
    ts = schedule(dtype, shape, rising)
    names = ["all"] if branches == 1 else ["cond", "uncond"]
    for gen in range(3):
        xs = inputs(branches)
        check_generation(model, compiled, run(compiled, ts, xs), ts, xs, names, gen)
    assert cachec.summary(compiled).timestep_input == "timestep"


def test_int64_cfg_calls_are_two_branches_and_generations_end_without_a_step_count():
    """Wan with UniPC: int64 timesteps, cond and uncond calls, no num_inference_steps."""
    model, compiled = compile_toy(**OPTS)
    ts = schedule(torch.int64, "(B,)", rising=False)
    for gen in range(2):
        xs = inputs(2)
        check_generation(model, compiled, run(compiled, ts, xs), ts, xs, ["cond", "uncond"], gen)


@pytest.mark.parametrize("branches", [1, 2])
def test_steps_whose_bf16_timesteps_collide_stay_separate_steps(branches):
    """FLUX at 50 steps and 1536x1536 in bf16: steps 1 and 2, and 5 and 6, get one value.
    Once the first step has shown how many calls a step has, equal timesteps never merge two steps."""
    values = [1.0, 0.99609375, 0.99609375, 0.9921875, 0.98828125, 0.984375, 0.984375, 0.98046875,
              0.9765625, 0.97265625]
    ts = [torch.tensor([v], dtype=torch.bfloat16) for v in values]
    model, compiled = compile_toy(**OPTS)
    for gen in range(2):
        xs = inputs(branches)
        outs = run(compiled, ts, xs)
        check_generation(model, compiled, outs, ts, xs, ["all"] if branches == 1 else ["cond", "uncond"], gen)


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_pipeline_names_decide_branches_and_step_index_the_steps(order):
    """Named as diffusers pipelines name them: the names are the branches whatever the call order,
    and ``step_index`` counts steps even when every call has the same timestep."""
    model, compiled = compile_toy(**OPTS)
    same = [torch.tensor([0.5])] * N
    for gen in range(3):   # a step_index that goes back starts the next generation
        xs = inputs(2)
        outs = run(compiled, same, xs, names=list(order))
        check_generation(model, compiled, outs, same, xs, list(order), gen)
        assert "step_index" in cachec.summary(compiled).identity


def test_pipeline_names_without_step_index_count_steps_per_branch():
    """FLUX and Qwen-Image name their calls but give no step index: each call of a
    branch is its next step; the timestep's turn back up ends the generation."""
    model, compiled = compile_toy(**OPTS)
    ts = schedule(torch.bfloat16, "(B,)", rising=False)
    ts[2] = ts[1]    # a bf16 collision, too
    for gen in range(2):
        xs = inputs(2)
        outs = run(compiled, ts, xs, names=["cond", "uncond"], step_index=False)
        check_generation(model, compiled, outs, ts, xs, ["cond", "uncond"], gen)


def test_names_seen_on_the_call_that_compiles():
    """The backend first runs inside the pipeline's first ``cache_context``: that call is named too."""
    model, compiled = compile_toy(**OPTS)
    xs = inputs(2)
    ts = schedule(torch.float32, "(B,)", rising=False)
    outs = run(compiled, ts, xs, names=["uncond", "cond"])
    check_generation(model, compiled, outs, ts, xs, ["uncond", "cond"], 0)


def test_a_new_resolution_in_a_named_branch_starts_afresh():
    model, compiled = compile_toy(**OPTS)
    ts = schedule(torch.float32, "(B,)", rising=False)
    run(compiled, ts[:5], inputs(2), names=["cond", "uncond"], step_index=False)
    xs = [torch.randn(1, 5, 8), 50 * torch.randn(1, 5, 8)]
    outs = run(compiled, ts, xs, names=["cond", "uncond"], step_index=False)
    check_generation(model, compiled, outs, ts, xs, ["cond", "uncond"], 1)


def test_summary_says_where_the_identity_came_from():
    model, compiled = compile_toy(**OPTS)
    ts = schedule(torch.int64, "(B,)", rising=False)
    run(compiled, ts, inputs(2))
    text = str(cachec.summary(compiled))
    assert "timestep input 'timestep'" in text and "cond" in text and "uncond" in text
    run(compiled, ts, inputs(2), names=["cond", "uncond"])
    s = cachec.summary(compiled)
    assert s.generation == 1 and "cache_context" in s.identity and "cache_context" in str(s)


def run_cfg_for(compiled, ts, xs, cfg_steps: int):
    """Both branches for the first ``cfg_steps`` steps, then the cond branch alone
    (CFG truncation, as Lumina's and some video pipelines do)."""
    outs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            outs.append([compiled(x, t)[0] for x in (xs if i < cfg_steps else xs[:1])])
    return outs


def test_cfg_that_stops_partway_keeps_each_branch_on_its_own_steps():
    from test_schedule import reference_schedule
    cfg = {**OPTS, "residual_diff_threshold": 0.6, "max_continuous_cached_steps": -1}
    model, compiled = compile_toy(**cfg)
    ts = schedule(torch.float32, "(B,)", rising=False)
    for gen in range(2):
        xs = inputs(2)
        outs = run_cfg_for(compiled, ts, xs, cfg_steps=6)
        s = cachec.summary(compiled)
        assert (s.generation, s.steps, s.calls) == (gen, N, N + 6)
        for b, (name, n) in enumerate([("cond", N), ("uncond", 6)]):
            want = reference_schedule(model, ts[:n], cfg, xs[b])
            assert s.branches[name].computed_steps == want and s.branches[name].cached_steps, name
            check_outputs(model, [o if b < len(o) else None for o in outs[:n]], ts[:n], xs, want, branch=b)


def test_a_model_that_takes_over_partway_counts_from_its_first_step():
    """Wan 2.2 A14B hands the low-noise steps to a second transformer: its first call has
    step_index 5 of 10, and its warmup counts from there."""
    model, compiled = compile_toy(**OPTS)
    ts = schedule(torch.float32, "(B,)", rising=False)
    for gen in range(2):
        xs = inputs(2)
        outs = []
        with torch.no_grad():
            for i in range(5, N):
                outs.append([])
                for name, x in zip(["cond", "uncond"], xs):
                    with compiled.cache_context(name, step_index=i, num_inference_steps=N):
                        outs[-1].append(compiled(x, ts[i])[0])
        s = cachec.summary(compiled)
        assert (s.generation, s.steps) == (gen, 5) and "pipeline's step 5" in s.identity
        for b, name in enumerate(["cond", "uncond"]):
            assert s.branches[name].computed_steps == [0, 1, 4]
            check_outputs(model, outs, ts[5:], xs, [0, 1, 4], branch=b)
