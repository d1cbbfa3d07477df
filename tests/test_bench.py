"""bench/e2e.py counts recompiles and graph breaks for its table: the counter against known cases."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import e2e  # noqa: E402


def test_compile_counter_counts_recompiles_and_graph_breaks():
    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    compiled = torch.compile(f, backend="eager", dynamic=False)
    with e2e.CompileCounter() as counter:
        for n in (3, 4, 5):          # each new size recompiles f and the resume function after the break
            compiled(torch.randn(n))
        compiled(torch.randn(5))     # cached: nothing new
    assert counter.recompiles == 4
    assert counter.graph_breaks == 3


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(30.0, 2.0), (35.0, 1.5), (32.0, 1.4), (40.0, 1.0), (25.0, 1.9), (35.0, 1.2)]
    # (32, 1.4) and (25, 1.9) lose on both axes; (35, 1.2) does not: no point has a higher PSNR and speedup
    assert e2e.pareto_front(points) == [(30.0, 2.0), (35.0, 1.2), (35.0, 1.5), (40.0, 1.0)]
    assert e2e.pareto_front([]) == []


def test_every_strategy_has_a_row_per_point_for_cachec_and_cache_dit():
    plan = e2e.rows(28, with_cache_dit=False, cache_dit_missing="left out")
    for s in e2e.STRATEGIES:
        for system in ("cachec", e2e.CACHE_DIT):
            mine = [r for r in plan if r.system == system and r.strategy == s.name]
            assert [r.setting for r in mine] == [s.label(p) for p in s.points]
            for r in mine:   # a cachec that lacks the feature says so instead of failing the run
                assert r.prepare is not None or r.note.startswith("needs cachec") or system != "cachec"
    only = e2e.select(plan, None, ["dbprune"])
    assert {r.strategy for r in only} == {"uncached", "DBPrune"}


def test_a_cachec_value_error_behind_dynamo_reads_as_a_missing_feature():
    row = e2e.Row("cachec", "DBPrune", "F1B0 r=0.1", None, feature="DBPrune")
    try:
        try:
            raise ValueError("unknown option 'cache_type'; did you mean 'max_cached_steps'? (allowed: [...])")
        except ValueError as inner:
            raise RuntimeError("backend='cachec' raised") from inner
    except RuntimeError as e:
        assert e2e.failure_note(row, e) == "needs cachec DBPrune: unknown option 'cache_type'"
    assert e2e.failure_note(row, KeyError("x")).startswith("failed: KeyError")
