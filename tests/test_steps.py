"""Step, generation and CFG bookkeeping: boundaries, branches, isolation, recompiles."""
import pytest
import torch

import cachec
from test_schedule import SHAPE, check_outputs, compile_toy, falling, reference_schedule, run_generation

OPTS = dict(residual_diff_threshold=1.0, max_warmup_steps=2, max_continuous_cached_steps=2)
WANT = [0, 1, 4, 7]   # 10 steps with OPTS, worked out by hand


def test_num_inference_steps_splits_a_schedule_that_keeps_falling():
    """Without the step count, [1.0 .. 0.55] then [0.5 .. 0.05] would read as one generation."""
    _, compiled = compile_toy(**OPTS, num_inference_steps=10)
    ts = falling(20)
    run_generation(compiled, ts[:10], [torch.randn(SHAPE)])
    run_generation(compiled, ts[10:], [torch.randn(SHAPE)])
    s = cachec.summary(compiled)
    assert (s.generation, s.steps, s.computed_steps) == (1, 10, WANT)


def test_without_step_count_a_monotone_schedule_is_one_generation():
    _, compiled = compile_toy(**OPTS)
    ts = falling(20)
    run_generation(compiled, ts[:10], [torch.randn(SHAPE)])
    run_generation(compiled, ts[10:], [torch.randn(SHAPE)])
    assert (cachec.summary(compiled).generation, cachec.summary(compiled).steps) == (0, 20)


def test_refresh_starts_a_generation_and_sets_the_step_count():
    _, compiled = compile_toy(**OPTS)
    ts = falling(20)
    run_generation(compiled, ts[:10], [torch.randn(SHAPE)])
    cachec.refresh(compiled, num_inference_steps=10)
    run_generation(compiled, ts[10:], [torch.randn(SHAPE)])
    s = cachec.summary(compiled)
    assert (s.generation, s.steps, s.computed_steps) == (1, 10, WANT)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        cachec.refresh(compiled, num_inference_steps=0)


def test_shape_change_starts_a_generation():
    _, compiled = compile_toy(**OPTS)
    ts = falling(20)
    run_generation(compiled, ts[:10], [torch.randn(SHAPE)])
    run_generation(compiled, ts[10:], [torch.randn(1, 5, 8)])
    s = cachec.summary(compiled)
    assert (s.generation, s.steps, s.computed_steps) == (1, 10, WANT)


@pytest.mark.parametrize("first, names", [(False, ["cond", "uncond"]), (True, ["uncond", "cond"])])
def test_separate_cfg_branches_are_independent_and_keep_their_roles(first, names):
    """Each branch decides as the reference schedule does on its own input; the call order within
    a step names the roles."""
    opts = dict(OPTS, residual_diff_threshold=0.6, max_continuous_cached_steps=-1, cfg_compute_first=first)
    ts = falling(10)
    model, compiled = compile_toy(**opts)
    for _ in range(2):
        xs = [torch.randn(SHAPE), 50 * torch.randn(SHAPE)]
        outs = run_generation(compiled, ts, xs, branches=2)
        s = cachec.summary(compiled)
        assert list(s.branches) == names
        for b, name in enumerate(names):
            want = reference_schedule(model, ts, opts, xs[b])
            assert s.branches[name].computed_steps == want and s.branches[name].cached_steps
            check_outputs(model, outs, ts, xs, want, branch=b)


def test_cfg_diff_shared_from_the_first_branch():
    """cfg_diff_compute_separate=False: the second branch takes the first one's diff, so both
    follow the schedule of the first branch's input."""
    opts = dict(OPTS, residual_diff_threshold=0.6, max_continuous_cached_steps=-1, cfg_diff_compute_separate=False)
    model, compiled = compile_toy(**opts)
    ts, xs = falling(10), [torch.randn(SHAPE), 50 * torch.randn(SHAPE)]
    outs = run_generation(compiled, ts, xs, branches=2)
    s = cachec.summary(compiled)
    want = reference_schedule(model, ts, opts, xs[0])
    assert want != reference_schedule(model, ts, opts, xs[1]), "the test needs branches that decide differently"
    assert s.branches["uncond"].residual_diffs == s.branches["cond"].residual_diffs
    for b, name in enumerate(["cond", "uncond"]):
        assert s.branches[name].computed_steps == want
        check_outputs(model, outs, ts, xs, want, branch=b)


def test_two_compiled_models_never_share_state():
    ts = falling(10)
    _, a = compile_toy(**OPTS)
    _, b = compile_toy(**dict(OPTS, max_continuous_cached_steps=-1))
    with torch.no_grad():
        for t in ts:
            a(torch.randn(SHAPE), torch.tensor([t]))
            b(torch.randn(SHAPE), torch.tensor([t]))
    assert cachec.summary(a).computed_steps == WANT
    assert cachec.summary(b).computed_steps == [0, 1]


def test_summary_accepts_the_original_module_and_prints_a_table():
    model, compiled = compile_toy(**OPTS)
    run_generation(compiled, falling(10), [torch.randn(SHAPE)])
    s = cachec.summary(model)
    assert s.computed_steps == WANT and s.blocks == [f"blocks.{i}" for i in range(4)]
    assert s.timestep_input == "timestep"
    text = str(s)
    assert "computed 4/10" in text and "warmup" in text and "max_continuous_cached_steps" in text
    with pytest.raises(ValueError, match="no cachec state"):
        cachec.summary(torch.nn.Linear(2, 2))


def test_no_recompiles_across_cached_steps_and_generations():
    _, compiled = compile_toy(**OPTS)
    ts = falling(10)
    run_generation(compiled, ts[:1], [torch.randn(SHAPE)])
    with torch.compiler.set_stance("fail_on_recompile"):
        run_generation(compiled, ts[1:], [torch.randn(SHAPE)])
        run_generation(compiled, ts, [torch.randn(SHAPE)])
    assert cachec.summary(compiled).computed_steps == WANT


def test_fn_plus_bn_covering_the_chain_names_the_block_count():
    _, compiled = compile_toy(Fn_compute_blocks=3, Bn_compute_blocks=1)
    with pytest.raises(Exception, match="has 4 chained blocks"):
        compiled(torch.randn(SHAPE), torch.tensor([1.0]))


def test_graph_without_block_loop_compiles_plainly_with_one_warning():
    mod = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    compiled = torch.compile(mod, backend="cachec", options={"inner_backend": "eager"})
    x = torch.randn(2, 8)
    with pytest.warns(cachec.CachecWarning, match="no cacheable block chain") as record:
        out = compiled(x)   # the warning waits for a second forward (or a known graph break)
        for _ in range(3):
            compiled(x)
    assert sum(issubclass(w.category, cachec.CachecWarning) for w in record) == 1
    torch.testing.assert_close(out, mod(x))
    strict = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8)), backend="cachec",
                           options={"inner_backend": "eager", "strict": True})
    with pytest.raises(Exception, match="strict=True"):
        strict(x)


def test_new_resolutions_and_dynamic_shape_graphs_start_fresh_generations():
    """The third shape makes dynamo compile a symbolic-shape graph; each shape is its own generation."""
    model, compiled = compile_toy(**OPTS)
    ts = falling(10)
    for tokens in (3, 5, 7, 5):
        x = [torch.randn(1, tokens, 8)]
        outs = run_generation(compiled, ts, x)
        assert cachec.summary(compiled).computed_steps == WANT
        check_outputs(model, outs, ts, x, WANT)


class GuidedToy(torch.nn.Module):
    """Two sinusoid-embedded scalars; the constant one (guidance) comes first and has no 'time' in its name."""

    def __init__(self):
        super().__init__()
        from toy import AddBlock
        self.register_buffer("freqs", torch.linspace(1.0, 3.0, 8))
        self.blocks = torch.nn.ModuleList([AddBlock(float(i + 1)) for i in range(4)])

    def forward(self, hidden_states, guidance, t):
        temb = torch.sin(t[:, None, None] * self.freqs) + torch.cos(guidance[:, None, None] * self.freqs)
        h = hidden_states
        for block in self.blocks:
            h = block(h, temb)
        return (h,)


def test_a_constant_guidance_input_is_told_apart_from_the_timestep():
    torch._dynamo.reset()
    compiled = torch.compile(GuidedToy(), backend="cachec", options={"inner_backend": "eager", **OPTS})
    g = torch.tensor([3.5])
    with torch.no_grad():
        for _ in range(2):   # two falling generations: the second starts when t jumps back up
            for t in falling(10):
                compiled(torch.randn(SHAPE), g, torch.tensor([t]))
    s = cachec.summary(compiled)
    assert (s.timestep_input, s.generation, s.steps, s.computed_steps) == ("t", 1, 10, WANT)
