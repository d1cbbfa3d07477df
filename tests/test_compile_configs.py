"""Recompile limits: cachec.set_compile_configs, the matching options, and the warning when
dynamo gives up on a cached model (it then runs eagerly and uncached)."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cachec
from cachec.compile_configs import SERVING_LIMITS
from toy import ToyDiT

LIMITS = ("recompile_limit", "accumulated_recompile_limit")


def limits() -> dict:
    return {k: getattr(torch._dynamo.config, k) for k in LIMITS}


@pytest.fixture(autouse=True)
def restore_limits():
    with torch._dynamo.config.patch(**limits()):
        yield


def test_set_compile_configs_sets_the_serving_limits_and_returns_the_old_ones():
    before = limits()
    assert cachec.set_compile_configs() == before
    assert limits() == SERVING_LIMITS
    assert cachec.set_compile_configs(recompile_limit=None, accumulated_recompile_limit=5) == SERVING_LIMITS
    assert limits() == {"recompile_limit": SERVING_LIMITS["recompile_limit"], "accumulated_recompile_limit": 5}


@settings(max_examples=30, deadline=None)
@given(value=st.one_of(st.integers(-3, 0), st.floats(1, 9), st.booleans(), st.text(max_size=2)))
def test_bad_limits_are_a_value_error_naming_them(value):
    with pytest.raises(ValueError, match="recompile_limit=.* expected None or an int >= 1"):
        cachec.set_compile_configs(recompile_limit=value)
    with pytest.raises(ValueError, match="accumulated_recompile_limit=.* expected None or an int >= 1"):
        cachec.parse_options({"accumulated_recompile_limit": value})


def shapes(compiled, sizes):
    with torch.no_grad():
        for n in sizes:
            compiled(torch.randn(1, n, 8), torch.tensor([0.5]))


def test_hitting_the_recompile_limit_warns_once_naming_the_limit():
    torch._dynamo.config.recompile_limit = 2
    compiled = torch.compile(ToyDiT(4), backend="cachec", options={"inner_backend": "eager"}, dynamic=False)
    with pytest.warns(cachec.CachecWarning, match=r"hit recompile_limit \(2\) compiling ToyDiT.forward.*"
                                                  r"cachec.set_compile_configs\(recompile_limit=N\)"):
        shapes(compiled, (4, 5, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cachec.CachecWarning)
        shapes(compiled, (7, 8))   # once per model


def test_the_options_raise_the_limit_when_the_model_compiles():
    torch._dynamo.config.recompile_limit = 2
    compiled = torch.compile(ToyDiT(4), backend="cachec", options={"inner_backend": "eager", "recompile_limit": 16},
                             dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cachec.CachecWarning)
        shapes(compiled, (4, 5, 6, 7))
    assert torch._dynamo.config.recompile_limit == 16
    assert len(cachec.summary(compiled).blocks) == 4   # still cached: the chain was found


def test_pieces_compile_without_input_asserts_unless_asked():
    """Inductor's per-call size/stride asserts are off in cachec's pieces (dynamo guards the
    first piece's inputs, cachec lays out the rest); the user's own inductor options win."""
    from cachec.backend import _inductor_patches
    assert _inductor_patches(cachec.parse_options({})) == {"size_asserts": False}
    assert _inductor_patches(cachec.parse_options({"inductor": {"size_asserts": True}})) == {"size_asserts": True}
    assert _inductor_patches(cachec.parse_options({"inductor": {"max_autotune": True}})) == {
        "size_asserts": False, "max_autotune": True}
    assert _inductor_patches(cachec.parse_options({"inner_backend": "aot_eager"})) == {}


def test_a_guard_filter_reaches_dynamo_beside_cachec_options():
    """``guard_filter_fn`` (README, *Guards*) goes in the same ``options`` as cachec's keys:
    torch.compile hands it to dynamo, which applies it, and cachec never sees it."""
    seen = []

    def keep_no_module_guards(entries):
        seen.append(len(entries))
        return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)

    torch.manual_seed(0)
    model, x = ToyDiT(4), torch.randn(1, 16, 8)
    compiled = torch.compile(model, backend="cachec", options={
        "inner_backend": "eager", "residual_diff_threshold": 0.0, "guard_filter_fn": keep_no_module_guards})
    with torch.no_grad():
        out = compiled(x, torch.tensor([1.0]))
        torch.testing.assert_close(out, model(x, torch.tensor([1.0])))
    assert seen and seen[0] > 0
    assert len(cachec.summary(compiled).blocks) == 4
