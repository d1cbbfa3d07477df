"""Real diffusers pipelines, called unchanged, with only ``pipe.transformer`` compiled by cachec.

For each: at threshold 0 the output equals the uncompiled pipeline's; at threshold 1 the
summary counts the pipeline's own steps in each of its branches and computes the steps
worked out by hand; two calls in a row, without ``cachec.refresh``, give identical outputs
and decisions and compile nothing new. The pipelines cover what the transformer is
handed (``tiny_pipelines`` lists it): int64 timesteps (UniPC, DPM-Solver, DDIM), a
(batch, seq_len) timestep, bf16 timesteps of which two pairs collide at 50 steps, named
calls with and without a step index, batched CFG named ("cond_uncond") and not, and
true CFG as two calls whose texts differ in length.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import cachec
import tiny_pipelines as tp

CACHED = dict(residual_diff_threshold=1.0, max_warmup_steps=2, max_continuous_cached_steps=2)


def by_hand(n: int) -> list[int]:
    """Steps computed at threshold 1 with 2 warmup steps and at most 2 cached in a row."""
    return [0, 1] + list(range(4, n, 3))


@dataclass
class Case:
    build: Callable
    steps: int
    branches: list
    identity: str          # a phrase the summary's identity must contain
    atol: float = 1e-5


CASES = {
    "wan_unipc": Case(tp.build_wan_pipeline, 8, ["cond", "uncond"], "step_index"),
    "wan_ti2v_per_token_timestep": Case(lambda: tp.build_wan_pipeline(expand_timesteps=True), 8,
                                        ["cond", "uncond"], "step_index"),
    "pixart_sigma_dpm_solver": Case(tp.build_pixart_sigma_pipeline, 8, ["all"], "timestep input"),
    "flux_bf16_50_steps_1536_shift": Case(tp.build_flux_pipeline, 50, ["cond"], "cache_context", atol=0),
    "qwenimage_true_cfg": Case(tp.build_qwenimage_pipeline, 8, ["cond", "uncond"], "cache_context"),
    "sd3_batched_cfg": Case(tp.build_sd3_pipeline, 8, ["all"], "timestep input"),
    "cogvideox_ddim_cond_uncond": Case(tp.build_cogvideox_pipeline, 8, ["cond_uncond"], "cache_context"),
}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


def compile_transformer(pipe, original, **options):
    torch._dynamo.reset()
    pipe.transformer = torch.compile(original, backend="cachec", options={"inner_backend": "eager", **options})


def test_threshold_zero_equals_the_uncompiled_pipeline(case):
    pipe = case.build()
    want = tp.generate(pipe, case.steps)
    original = pipe.transformer
    compile_transformer(pipe, original, residual_diff_threshold=0.0)
    got = tp.generate(pipe, case.steps)
    torch.testing.assert_close(got, want, rtol=case.atol, atol=case.atol)
    s = cachec.summary(pipe.transformer)
    assert list(s.branches) == case.branches and s.steps == case.steps
    assert all(b.computed_steps == list(range(case.steps)) for b in s.branches.values())


def test_cached_steps_are_the_pipelines_own_and_repeat_without_refresh(case):
    pipe = case.build()
    original = pipe.transformer
    compile_transformer(pipe, original, **CACHED)
    first = tp.generate(pipe, case.steps)
    s = cachec.summary(pipe.transformer)
    assert (s.generation, s.steps) == (0, case.steps) and case.identity in s.identity, str(s)
    assert list(s.branches) == case.branches
    for name, b in s.branches.items():
        assert b.computed_steps == by_hand(case.steps), (name, str(s))
        assert b.cached_steps == [i for i in range(case.steps) if i not in by_hand(case.steps)]
    with torch.compiler.set_stance("fail_on_recompile"):
        second = tp.generate(pipe, case.steps)
    again = cachec.summary(pipe.transformer)
    assert again.generation == 1
    assert {n: (b.computed_steps, b.residual_diffs) for n, b in again.branches.items()} == \
           {n: (b.computed_steps, b.residual_diffs) for n, b in s.branches.items()}
    torch.testing.assert_close(second, first, rtol=0, atol=0)
