"""Strategies as plug-ins: the handler tables, DBPrune on every forward pattern and on FLUX's
two block kinds, calibrators exact on their polynomials, and hybrids in one options dict."""
import ast
import math
import pathlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cachec
from cachec.options import DBCacheConfig, DBPruneConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig
from cachec.runtime import CALIBRATORS, STRATEGIES, calibrator_for
from cachec.runtime.calibrators import FoCa, TaylorSeer
from cachec.runtime.strategies import DBCache, DBPrune
from reference import HookedDBPrune
from test_models import assert_outputs_close, compile_case, denoise
from test_patterns import pattern_case
from test_syncs import SyncCounter
from tiny_models import build
from toy import ToyDiT, reference_outputs

PATTERN_RETURNS = {0: ("h", "e"), 1: ("e", "h"), 2: ("h",), 3: ("h",), 4: ("h", "v"), 5: ("v", "h")}


def test_one_table_maps_each_config_to_its_handler():
    from cachec.options import DiTangoConfig, FlexDBCacheConfig, PABConfig, TeaCacheConfig
    from cachec.runtime.strategies import PAB, DiTango, TeaCache
    assert STRATEGIES == {DBCacheConfig: DBCache, DBPruneConfig: DBPrune, TeaCacheConfig: TeaCache,
                          FlexDBCacheConfig: DBCache, PABConfig: PAB, DiTangoConfig: DiTango}
    assert CALIBRATORS == {TaylorSeerCalibratorConfig: TaylorSeer, FoCaCalibratorConfig: FoCa}
    with pytest.raises(ValueError, match="no calibrator for int"):
        calibrator_for(3)


def test_runtime_never_imports_passes():
    root = pathlib.Path(cachec.__file__).parent / "runtime"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "passes" not in (node.module or ""), f"{path.name} imports {node.module}"


# ------------------------------------------------------------------------------------ calibrators

def predict(cal, step):
    """What the compiled combination computes, restated eagerly."""
    terms, coefs = cal.combination(step)
    pred = sum(c * t.double() for c, t in zip(coefs, terms))
    if cal.keep:
        cal.kept(pred.float(), step)
    return pred


@settings(max_examples=60, deadline=None)
@given(order=st.integers(1, 3), a=st.floats(-2, 2), b=st.floats(-2, 2), data=st.data())
def test_taylorseer_is_exact_on_lines_at_any_spacing(order, a, b, data):
    early = sorted(data.draw(st.sets(st.integers(0, 2), max_size=3)))   # before step 3: d[0] only
    steps = early + sorted(data.draw(st.sets(st.integers(3, 30), min_size=2, max_size=order + 4)))
    cal = TaylorSeer(TaylorSeerCalibratorConfig(taylorseer_order=order))
    for s in steps:
        cal.update(torch.full((2, 3), a + b * s), s)
    for k in range(1, 5):
        torch.testing.assert_close(predict(cal, steps[-1] + k), torch.full((2, 3), a + b * (steps[-1] + k),
                                   dtype=torch.float64), rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(c=st.floats(0.1, 2), n=st.integers(1, 4), k=st.integers(1, 5))
def test_taylorseer_order2_takes_backward_differences_for_derivatives(c, n, k):
    """cache-dit's rule, kept: on f(s) = c s^2 sampled every n steps, d[1] is the backward
    difference f'(s) - c n, so the prediction k steps on is short of f(s + k) by c n k exactly."""
    cal = TaylorSeer(TaylorSeerCalibratorConfig(taylorseer_order=2))
    for s in (3, 3 + n, 3 + 2 * n):
        cal.update(torch.full((3,), c * s * s), s)
    s = 3 + 2 * n + k
    assert float(predict(cal, s)[0]) == pytest.approx(c * s * s - c * n * k, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_takes_derivatives_from_step_3_as_cache_dit_does(order):
    """By hand, on values 1, 10, 100, ... at steps 0, 1, 2, ...: steps 0-2 keep the value alone
    (a cached step reuses it), step 3 adds the first difference, each later update one order more."""
    cal = TaylorSeer(TaylorSeerCalibratorConfig(taylorseer_order=order))
    y = lambda s: torch.full((2,), 10.0 ** s)  # noqa: E731
    for s in range(3):
        cal.update(y(s), s)
        assert float(predict(cal, s + 1)[0]) == 10.0 ** s
    cal.update(y(3), 3)   # d = [1000, 900]
    assert float(predict(cal, 5)[0]) == pytest.approx(1000 + 900 * 2)
    cal.update(y(4), 4)   # d = [10^4, 9000, 8100] up to the order
    want = [10.0 ** 4, 9000, 8100][:order + 1]
    assert float(predict(cal, 6)[0]) == pytest.approx(sum(d * 2 ** i / math.factorial(i) for i, d in enumerate(want)))


@settings(max_examples=60, deadline=None)
@given(runs=st.lists(st.integers(0, 3), min_size=1, max_size=8), a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_foca_is_exact_on_lines_within_its_horizon_on_any_schedule(runs, a, b):
    """Two computed steps give the line; then runs of up to 3 cached steps (FoCa's horizon; beyond
    it cache-dit's damping pulls toward the anchor) between single computed steps are predicted
    exactly, whatever the gaps between computed steps."""
    f = lambda s: torch.full((4,), a + b * s, dtype=torch.float32)  # noqa: E731
    cal = FoCa(FoCaCalibratorConfig())
    cal.update(f(0), 0)
    cal.update(f(1), 1)
    s = 2
    for run in runs:
        for _ in range(run):
            torch.testing.assert_close(predict(cal, s), f(s).double(), rtol=1e-5, atol=1e-5)
            s += 1
        cal.update(f(s), s)
        s += 1


@settings(max_examples=30, deadline=None)
@given(cached_runs=st.lists(st.integers(0, 5), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_foca_equals_cache_dits_where_computed_steps_come_in_pairs(cached_runs, seed):
    """cache-dit's FoCa takes every step distance as 1: where each computed step follows another
    computed step, both distances are 1 and the predictions agree."""
    foca = pytest.importorskip("cache_dit.caching.cache_contexts.calibrators.foca")
    g = torch.Generator().manual_seed(seed)
    ours, theirs, s = FoCa(FoCaCalibratorConfig()), foca.FoCaState(), 0
    for run in cached_runs:
        for _ in range(2):
            y = torch.randn(5, generator=g)
            theirs.mark_step_begin()
            theirs.update(y)
            ours.update(y, s)
            s += 1
        for _ in range(run):
            theirs.mark_step_begin()
            torch.testing.assert_close(predict(ours, s).float(), theirs.approximate(), rtol=1e-5, atol=1e-5)
            s += 1


# --------------------------------------------------------------------------------------- DBPrune

def prune_reference(case, ts, blocks, returns, **cfg):
    hooks = HookedDBPrune(case.model, blocks, cfg.get("Fn", 1), cfg.get("Bn", 0), cfg["threshold"],
                          cfg.get("warmup", 1), cfg.get("max_continuous", -1), returns)
    calls = {"n": 0}

    def hooked(**kw):
        hooks.step(calls["n"], "cond")
        calls["n"] += 1
        return case.model(**kw)
    try:
        return denoise(hooked, case, ts), hooks.ran["cond"]
    finally:
        hooks.remove()


def check_prune(case, returns, threshold, ts, max_continuous=-1, atol=1e-5):
    compiled = compile_case(case, cache_type="DBPrune", residual_diff_threshold=threshold, max_warmup_steps=1,
                            max_continuous_cached_steps=max_continuous)
    got = denoise(compiled, case, ts)
    s = cachec.summary(compiled)
    want, ran = prune_reference(case, ts, s.blocks, returns, threshold=threshold, max_continuous=max_continuous)
    branch = s.branches["all"]
    for step in range(len(ts)):
        assert [b for b, r in branch.block_map.items() if r.get(step, True)] == ran[step], step
        assert branch.blocks_run[step] == 1 + len(ran[step])   # Fn = 1, Bn = 0
    assert_outputs_close(got, want, atol)
    return s


@pytest.mark.parametrize("pattern", range(6))
def test_dbprune_works_on_every_forward_pattern(pattern):
    """cache-dit's DBPrune crashes on patterns 3, 4 and 5; here each equals the eager restatement."""
    case = pattern_case(pattern)
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    pruned = 0
    for threshold in (0.0, 0.08, 0.3):
        s = check_prune(case, lambda name: PATTERN_RETURNS[pattern], threshold, ts, max_continuous=2)
        pruned += sum(not r for m in s.branches["all"].block_map.values() for r in m.values())
    assert pruned > 0, "no threshold pruned anything: the test would not see a wrong reuse"


def test_dbprune_on_fluxs_chain_of_two_block_kinds_with_one_read_per_call():
    case = build("flux")
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    s = check_prune(case, lambda name: ("e", "h"), 0.3, ts, atol=1e-4)
    assert {b.split(".")[0] for b in s.branches["all"].block_map} == {"transformer_blocks",
                                                                       "single_transformer_blocks"}
    assert any(not r for m in s.branches["all"].block_map.values() for r in m.values())
    assert "regions x steps" in str(s) and "pruned" in str(s)


def test_dbprune_reads_once_per_call_and_never_recompiles():
    case = pattern_case(0)
    compiled = compile_case(case, cache_type="DBPrune", residual_diff_threshold=0.3, max_warmup_steps=1)
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    denoise(compiled, case, ts)
    with SyncCounter() as syncs, torch.compiler.set_stance("fail_on_recompile"):
        denoise(compiled, case, ts)
    assert syncs.count <= len(ts)


def test_non_prune_block_ids_and_max_cached_steps_bound_each_block():
    case = pattern_case(0)
    compiled = compile_case(case, cache_type="DBPrune", residual_diff_threshold=1.0, max_warmup_steps=1,
                            non_prune_block_ids=[2], max_cached_steps=3, max_continuous_cached_steps=-1)
    denoise(compiled, case, torch.linspace(1.0, 0.1, 8).tolist())
    branch = cachec.summary(compiled).branches["all"]
    # threshold >= 1 prunes every prunable block from step 1 until it was pruned 3 times
    assert sorted(branch.block_map) == ["blocks.1", "blocks.3"]   # not Fn, not blocks.2: they always run
    for b in ("blocks.1", "blocks.3"):
        assert [step for step, r in branch.block_map[b].items() if not r] == [1, 2, 3]
    assert branch.blocks_run == {0: 4, 1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 4}


# ---------------------------------------------------------------------------------------- hybrids

def foca_outputs(model, x, ts, computed):
    """DBCache + FoCa on the toy, restated: cached steps add FoCa's prediction of the middle residual."""
    n, outs, cal = len(model.blocks), [], FoCa(FoCaCalibratorConfig())
    with torch.no_grad():
        for s, t in enumerate(ts):
            temb = model.temb(torch.tensor([t]))
            h = model.blocks[0](x, temb)
            if s in computed:
                out = h
                for b in model.blocks[1:n]:
                    out = b(out, temb)
                cal.update(out - h, s)
            else:
                out = h + predict(cal, s).float()
            outs.append(out)
    return outs


@pytest.mark.parametrize("calibrator", ["foca", "taylorseer"])
def test_dbcache_scm_and_a_calibrator_in_one_options_dict(calibrator):
    """vllm-omni's hybrid: DBCache + a named SCM mask (static) + a calibrator, with no recompile."""
    torch._dynamo.reset()
    model = ToyDiT(4)
    cal = {"calibrator_config": cachec.FoCaCalibratorConfig()} if calibrator == "foca" else \
        {"enable_taylorseer": True, "taylorseer_order": 2}
    compiled = torch.compile(model, backend="cachec", options={
        "inner_backend": "eager", "scm_steps_mask_policy": "fast", "scm_steps_policy": "static",
        "num_inference_steps": 28, "max_warmup_steps": 2, **cal})
    ts = torch.linspace(1.0, 0.02, 28).tolist()
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [compiled(x, torch.tensor([t]))[0] for t in ts]
        with torch.compiler.set_stance("fail_on_recompile"):
            again = [compiled(x, torch.tensor([t]))[0] for t in ts]
    s = cachec.summary(compiled)
    mask = cachec.steps_mask(total_steps=28, mask_policy="fast")
    assert s.computed_steps == [i for i, m in enumerate(mask) if m]
    assert {s.branches["all"].status[i] for i in s.cached_steps} == {"extrapolated"}
    want = foca_outputs(model, x, ts, s.computed_steps) if calibrator == "foca" else \
        reference_outputs(model, x, ts, s.computed_steps, order=2)
    for step in range(28):
        torch.testing.assert_close(outs[step], want[step], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again[step], outs[step])


def test_dbprune_with_a_calibrator_in_one_options_dict():
    case = pattern_case(0)
    compiled = compile_case(case, cache_type="DBPrune", residual_diff_threshold=1.0, max_warmup_steps=2,
                            max_continuous_cached_steps=2, calibrator_config={"calibrator_type": "foca"})
    ts = torch.linspace(1.0, 0.1, 8).tolist()
    first = denoise(compiled, case, ts)
    with torch.compiler.set_stance("fail_on_recompile"):
        second = denoise(compiled, case, ts)
    assert_outputs_close(second, first, 0)
    s = cachec.summary(compiled)
    assert s.branches["all"].status[2] == "pruned" and s.strategy == "DBPrune"
