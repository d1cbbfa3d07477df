"""DBCache decisions and outputs on a toy model whose outputs are known exactly."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cachec
from toy import ToyDiT, fn_residual, reference_outputs, relative_l1

SHAPE = (1, 3, 8)


def compile_toy(n_blocks=4, **options):
    torch._dynamo.reset()   # hypothesis examples share one test call: stay under the recompile limit
    model = ToyDiT(n_blocks)
    return model, torch.compile(model, backend="cachec", options={"inner_backend": "eager", **options})


def falling(n, hi=1.0, lo=0.05):
    return torch.linspace(hi, lo, n).tolist()


def run_generation(compiled, ts, x, *, branches=1):
    outs = []
    with torch.no_grad():
        for t in ts:
            outs.append([compiled(x[b], torch.tensor([t]))[0] for b in range(branches)])
    return outs


def reference_schedule(model, ts, cfg, x, Fn=1):
    """cache-dit's DBCache rules restated as one loop over the steps (Fn diff of the toy on input ``x``)."""
    mask, static = cfg.get("steps_computation_mask"), cfg.get("steps_computation_policy") == "static"
    warmup = cfg.get("max_warmup_steps", 4)
    if mask is not None:   # cache-dit truncates warmup to the mask's leading run of 1s
        warmup = min(warmup, next((i for i, m in enumerate(mask) if m == 0), len(mask)))
    warm = set(range(0, warmup, cfg.get("warmup_interval", 1)))
    thr = cfg.get("residual_diff_threshold", 0.24)
    max_cached, max_cont = cfg.get("max_cached_steps", -1), cfg.get("max_continuous_cached_steps", 3)
    acc_thr = cfg.get("max_accumulated_residual_diff_threshold")
    computed, last, cont, acc = [], None, 0, 0.0
    for s, t in enumerate(ts):
        n_cached = s - len(computed)
        if s in warm or last is None or (mask is not None and mask[s] == 1):
            compute = True
        elif mask is not None and static:
            compute = False
        elif 0 <= max_cached <= n_cached or 0 <= max_cont <= cont \
                or (acc_thr is not None and acc >= acc_thr) or thr <= 0:
            compute = True
        elif thr >= 1:
            compute = False
        else:
            d = relative_l1(fn_residual(model, x, ts[last], Fn), fn_residual(model, x, t, Fn))
            acc += d
            compute = d >= thr
        if compute:
            computed.append(s)
            last, cont = s, 0
        else:
            cont += 1
    return computed


def check_outputs(model, outs, ts, x, computed, Fn=1, Bn=0, branch=0, order=0):
    want = reference_outputs(model, x[branch], ts, computed, Fn, Bn, order)
    for s in range(len(ts)):
        torch.testing.assert_close(outs[s][branch], want[s], rtol=1e-5, atol=1e-5, msg=lambda m: f"step {s}: {m}")


@pytest.mark.parametrize("cfg, n, computed", [
    # worked out by hand: threshold >= 1 caches every step nothing else forces to compute
    ({"max_warmup_steps": 2, "max_continuous_cached_steps": 2}, 10, [0, 1, 4, 7]),
    ({"max_warmup_steps": 3, "warmup_interval": 2, "max_continuous_cached_steps": -1}, 10, [0, 2]),
    ({"max_warmup_steps": 1, "max_cached_steps": 3, "max_continuous_cached_steps": -1}, 8, [0, 4, 5, 6, 7]),
    ({"max_warmup_steps": 0, "max_continuous_cached_steps": 1}, 6, [0, 2, 4]),
])
def test_hand_worked_schedules(cfg, n, computed):
    model, compiled = compile_toy(**cfg, residual_diff_threshold=1.0)
    ts, x = falling(n), [torch.randn(SHAPE)]
    outs = run_generation(compiled, ts, x)
    s = cachec.summary(compiled)
    assert s.computed_steps == computed
    assert s.cached_steps == [i for i in range(n) if i not in computed]
    check_outputs(model, outs, ts, x, computed)


MASK = [1, 1, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("mask, policy, cfg, computed", [
    # warmup 4 is cut to the mask's two leading 1s; static caches every 0-step, past max_continuous too
    (MASK, "static", {"max_warmup_steps": 4, "max_continuous_cached_steps": 1, "residual_diff_threshold": 0.0},
     [0, 1, 4, 8]),
    # dynamic: a 0-step still goes through the gate (threshold >= 1 caches, max_continuous 1 forces steps 3 and 6)
    (MASK, "dynamic", {"max_warmup_steps": 4, "max_continuous_cached_steps": 1, "residual_diff_threshold": 1.0},
     [0, 1, 3, 4, 6, 8]),
    # dynamic with threshold 0: nothing is cached, whatever the mask says
    (MASK, "dynamic", {"max_warmup_steps": 0, "residual_diff_threshold": 0.0}, list(range(9))),
    # a mask that starts with 0 leaves no warmup; step 0 computes because nothing is cached yet
    ([0, 0] + MASK[2:], "static", {"max_warmup_steps": 4}, [0, 4, 8]),
])
def test_steps_computation_mask_hand_worked(mask, policy, cfg, computed):
    model, compiled = compile_toy(**cfg, steps_computation_mask=mask, steps_computation_policy=policy)
    ts, x = falling(len(mask)), [torch.randn(SHAPE)]
    outs = run_generation(compiled, ts, x)
    s = cachec.summary(compiled)
    assert s.computed_steps == computed
    check_outputs(model, outs, ts, x, computed)
    if policy == "static":   # the mask decides alone: no diff is measured on its cache steps
        assert not set(s.residual_diffs) & set(s.cached_steps)
    with pytest.raises(ValueError, match=f"steps_computation_mask has {len(mask)} entries but num_inference_steps=5"):
        cachec.refresh(compiled, num_inference_steps=5)   # a new step count needs a new mask


def test_taylorseer_order1_is_the_line_through_the_last_two_computed_steps():
    # computed [0, 1, 4, 7] as in the hand-worked schedule above; derivatives from step 3 on, so
    # steps 2 and 3 reuse step 1's residual as it was
    model, compiled = compile_toy(residual_diff_threshold=1.0, max_warmup_steps=2, max_continuous_cached_steps=2,
                                  enable_taylorseer=True)
    ts, x = falling(10), [torch.randn(SHAPE)]
    outs = run_generation(compiled, ts, x)
    assert cachec.summary(compiled).computed_steps == [0, 1, 4, 7]
    block0, mid = model.blocks[0], model.blocks[1:]
    def parts(step):   # the first block's output, and the middle's residual on top of it
        temb = model.temb(torch.tensor([ts[step]]))
        with torch.no_grad():
            h = block0(x[0], temb)
            out = h
            for b in mid:
                out = b(out, temb)
        return h, out - h
    for s, (c1, c2) in {2: (1, 1), 3: (1, 1), 5: (1, 4), 6: (1, 4), 8: (4, 7), 9: (4, 7)}.items():
        slope = (parts(c2)[1] - parts(c1)[1]) / (c2 - c1) if c2 > c1 else 0
        line = parts(c2)[1] + slope * (s - c2)
        torch.testing.assert_close(outs[s][0], parts(s)[0] + line, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("cfg", [
    {"max_warmup_steps": 1, "max_continuous_cached_steps": 2, "residual_diff_threshold": 1.0},
    {"max_warmup_steps": 3, "max_continuous_cached_steps": 1, "residual_diff_threshold": 1.0},
    {"steps_computation_mask": [1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0], "steps_computation_policy": "static",
     "max_warmup_steps": 0},
])
def test_taylorseer_follows_the_derivative_table_per_branch_and_generation(order, cfg):
    model, compiled = compile_toy(5, **cfg, Fn_compute_blocks=1, Bn_compute_blocks=1,
                                  enable_taylorseer=True, taylorseer_order=order)
    ts = falling(12)
    for gen in range(2):   # a new generation starts a new derivative table
        x = [torch.randn(SHAPE) for _ in range(2)]
        outs = run_generation(compiled, ts, x, branches=2)
        s = cachec.summary(compiled)
        assert s.generation == gen and s.cached_steps
        for b, name in enumerate(s.branches):
            check_outputs(model, outs, ts, x, s.branches[name].computed_steps, Fn=1, Bn=1, branch=b, order=order)


def test_threshold_zero_computes_every_step_and_matches_eager():
    model, compiled = compile_toy(residual_diff_threshold=0.0, max_warmup_steps=1)
    ts, x = falling(6), [torch.randn(SHAPE)]
    outs = run_generation(compiled, ts, x)
    assert cachec.summary(compiled).computed_steps == list(range(6))
    with torch.no_grad():
        for s, t in enumerate(ts):
            torch.testing.assert_close(outs[s][0], model(x[0], torch.tensor([t]))[0], rtol=0, atol=0)


def test_diffs_are_relative_l1_of_the_fn_residual():
    model, compiled = compile_toy(residual_diff_threshold=0.5, max_warmup_steps=1, max_continuous_cached_steps=-1)
    ts, x = falling(5), [torch.randn(SHAPE)]
    run_generation(compiled, ts, x)
    s = cachec.summary(compiled)
    last = 0
    for step in range(1, 5):
        want = relative_l1(fn_residual(model, x[0], ts[last]), fn_residual(model, x[0], ts[step]))
        assert s.residual_diffs[step] == pytest.approx(want, rel=1e-5)
        if step in s.computed_steps:
            last = step


configs = st.fixed_dictionaries({
    "max_warmup_steps": st.integers(0, 4),
    "warmup_interval": st.integers(1, 3),
    "max_cached_steps": st.integers(-1, 5),
    "max_continuous_cached_steps": st.integers(-1, 3),
    "residual_diff_threshold": st.sampled_from([0.0, 0.05, 0.15, 0.3, 0.6, 1.0]),
    "max_accumulated_residual_diff_threshold": st.sampled_from([None, 0.2, 1.0]),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, n=st.integers(2, 12), Fn=st.integers(1, 2), Bn=st.integers(0, 1),
       rising=st.booleans(), branches=st.sampled_from([1, 2]),
       mask=st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=12, max_size=12)),
       policy=st.sampled_from(["dynamic", "static"]))
def test_schedule_matches_reference_every_generation(cfg, n, Fn, Bn, rising, branches, mask, policy):
    """Three generations in a row: each follows the reference schedule, per CFG branch."""
    if mask is not None:
        cfg = {**cfg, "steps_computation_mask": mask[:n], "steps_computation_policy": policy}
    model, compiled = compile_toy(5, **cfg, Fn_compute_blocks=Fn, Bn_compute_blocks=Bn)
    ts = falling(n)[::-1] if rising else falling(n)
    for gen in range(3):
        x = [torch.randn(SHAPE) * (b + 1) for b in range(branches)]
        outs = run_generation(compiled, ts, x, branches=branches)
        s = cachec.summary(compiled)
        assert s.generation == gen and s.steps == n and s.calls == n * branches
        for b, name in enumerate(s.branches):
            want = reference_schedule(model, ts, cfg, x[b], Fn)
            assert s.branches[name].computed_steps == want, (gen, name)
            check_outputs(model, outs, ts, x, want, Fn, Bn, branch=b)
