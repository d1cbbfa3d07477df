"""SCM named masks: exact at 28 steps, cachec's scaling invariants at any step count, explicit bins, errors."""
import inspect
import itertools
import math

import pytest
from hypothesis import given, settings, strategies as st

from cachec.scm import SCM_BINS, SCM_POLICIES, named_mask, steps_mask

# cache-dit's 28-step masks, written out by hand run by run (compute, cache, compute, ...).
MASKS_28 = {
    "slow": "11111111" "0" "111" "00" "111" "00" "11" "00" "1" "000" "1",
    "medium": "111111" "0" "11" "000" "11" "000" "11" "000" "11" "000" "1",
    "fast": "111111" "0" "1" "000" "1" "0000" "1" "00000" "1" "0000" "1",
    "ultra": "1111" "00" "1" "00000" "1" "000000" "1" "0000000" "1",
}
COMPUTED_28 = {"slow": 18, "medium": 15, "fast": 11, "ultra": 8}
LONGEST_CACHE_BIN = {"slow": 3, "medium": 3, "fast": 5, "ultra": 7}
# Step counts where no mask with the first and last step computed and cached runs within the
# bound can compute within one step of frac * N (the module docstring lists the same ones).
FORCED_UP = {"slow": set(), "medium": set(), "fast": {2, 4, 5}, "ultra": {2, 3, 4, 5, 6, 8, 10}}


def as_str(mask):
    return "".join(map(str, mask))


def runs(mask, value):
    return [len(list(g)) for k, g in itertools.groupby(mask) if k == value]


def run_bound(policy, n):
    return max(1, math.ceil(LONGEST_CACHE_BIN[policy] * n / 28))


def least_feasible_computed(policy, n):
    # Fewest computed steps any valid mask can have: first and last compute, and the
    # cached steps fit in the gaps between computed steps in runs within the bound.
    b = run_bound(policy, n)
    return next(m for m in range(min(n, 2), n + 1) if (m - 1) * b >= n - m)


@pytest.mark.parametrize("policy", SCM_POLICIES)
def test_28_steps_are_cache_dits_bins(policy):
    assert len(MASKS_28[policy]) == 28 and MASKS_28[policy].count("1") == COMPUTED_28[policy]
    assert as_str(steps_mask(total_steps=28, mask_policy=policy)) == MASKS_28[policy]
    assert as_str(steps_mask(None, None, 28, policy)) == MASKS_28[policy]
    assert as_str(named_mask(policy, 28)) == MASKS_28[policy]


def test_table_is_immutable_and_matches_the_masks():
    assert tuple(SCM_BINS) == SCM_POLICIES == ("slow", "medium", "fast", "ultra")
    for policy, (compute, cache) in SCM_BINS.items():
        assert runs(MASKS_28[policy], "1") == list(compute) and runs(MASKS_28[policy], "0") == list(cache)
    with pytest.raises(TypeError):
        SCM_BINS["slow"] = ((28,), ())


@settings(deadline=None)
@given(policy=st.sampled_from(SCM_POLICIES), n=st.integers(1, 400))
def test_scaled_mask_invariants(policy, n):
    mask = steps_mask(total_steps=n, mask_policy=policy)
    assert isinstance(mask, list) and len(mask) == n and set(mask) <= {0, 1}
    assert mask[0] == 1 and mask[-1] == 1
    assert max(runs(mask, 0), default=0) <= run_bound(policy, n)
    computed, frac = sum(mask), COMPUTED_28[policy] / 28
    assert computed >= least_feasible_computed(policy, n)
    if n in FORCED_UP[policy]:
        assert computed == least_feasible_computed(policy, n) > frac * n + 1
    else:
        assert abs(computed - frac * n) <= 1
    compute_runs = runs(mask, 1)
    assert compute_runs[0] == max(compute_runs)  # the policy's compute-heavy start
    assert named_mask(policy, n) == tuple(mask) == tuple(steps_mask(total_steps=n, mask_policy=policy))


def test_computed_steps_fall_from_slow_to_ultra():
    for n in range(1, 401):
        computed = [sum(named_mask(p, n)) for p in SCM_POLICIES]
        assert computed == sorted(computed, reverse=True), (n, computed)


def test_small_step_counts():
    assert [steps_mask(total_steps=n, mask_policy="ultra") for n in (1, 2, 3)] == [[1], [1, 1], [1, 0, 1]]
    assert as_str(steps_mask(total_steps=10, mask_policy="ultra")) == "1001001001"
    assert as_str(steps_mask(total_steps=16, mask_policy="fast")) == "1100100100010001"


def test_returns_a_fresh_list():
    mask = steps_mask(total_steps=28, mask_policy="fast")
    mask[1] = 0
    assert as_str(steps_mask(total_steps=28, mask_policy="fast")) == MASKS_28["fast"]


def test_explicit_bins():
    want = [1] * 6 + [0] + [1] + [0, 0, 0] + [1]
    assert steps_mask([6, 1, 1], [1, 3]) == want
    assert steps_mask([6, 1, 1], [1, 3], 12) == want
    assert steps_mask((6, 1, 1), (1, 3), mask_policy="ultra") == want  # bins win over the policy
    assert steps_mask([3], []) == [1, 1, 1]
    with pytest.raises(ValueError, match=r"add up to 12 steps, but total_steps=13"):
        steps_mask([6, 1, 1], [1, 3], 13)
    with pytest.raises(ValueError, match=r"add up to 12 steps, but total_steps=10"):
        steps_mask([6, 1, 1], [1, 3], total_steps=10)


@pytest.mark.parametrize("compute, cache, name", [
    ([6, 0, 1], [1, 3], "compute_bins"),
    ([6, 1, 1], [1, -3], "cache_bins"),
    ([6, 1.0, 1], [1, 3], "compute_bins"),
    ([True, 1], [1], "compute_bins"),
    ("611", [1, 3], "compute_bins"),
    ([6, 1], [1, 3], "compute_bins"),  # one more compute bin than cache bins
    ([6, 1, 1], [1], "compute_bins"),
    ([6, 1, 1], None, "cache_bins"),  # cache-dit would silently use the named mask
    (None, [1, 3], "compute_bins"),
])
def test_bad_bins(compute, cache, name):
    with pytest.raises(ValueError, match=f"{name}="):
        steps_mask(compute, cache)


@given(compute=st.lists(st.integers(1, 5), min_size=1, max_size=6), data=st.data())
def test_explicit_bins_round_trip(compute, data):
    cache = data.draw(st.lists(st.integers(1, 5), min_size=len(compute) - 1, max_size=len(compute) - 1))
    mask = steps_mask(compute, cache, sum(compute) + sum(cache))
    assert runs(mask, 1) == compute and runs(mask, 0) == cache


def test_named_mask_needs_total_steps():
    for call in (lambda: steps_mask(), lambda: steps_mask(mask_policy="fast")):
        with pytest.raises(ValueError, match=r"needs the step count.*total_steps.*num_inference_steps"):
            call()


@pytest.mark.parametrize("policy", ["Fast", "turbo", "", None])
def test_bad_policy(policy):
    with pytest.raises(ValueError, match=r"mask_policy=.*\('slow', 'medium', 'fast', 'ultra'\)"):
        steps_mask(total_steps=28, mask_policy=policy)


@pytest.mark.parametrize("total_steps", [0, -1, 2.0, True, "28"])
def test_bad_total_steps(total_steps):
    with pytest.raises(ValueError, match=r"total_steps=.* expected an int >= 1"):
        steps_mask(total_steps=total_steps, mask_policy="fast")
    with pytest.raises(ValueError, match=r"total_steps=.* expected an int >= 1"):
        steps_mask([1], [], total_steps)


def test_same_call_as_cache_dit_same_masks_at_28_different_scaling():
    cache_dit = pytest.importorskip("cache_dit")
    theirs_sig, ours_sig = inspect.signature(cache_dit.steps_mask), inspect.signature(steps_mask)
    assert [(p.name, p.default) for p in theirs_sig.parameters.values()] == \
        [(p.name, p.default) for p in ours_sig.parameters.values()]
    for policy in SCM_POLICIES:
        assert steps_mask(total_steps=28, mask_policy=policy) == cache_dit.steps_mask(total_steps=28,
                                                                                        mask_policy=policy)
    # cache-dit trims the tail bins below 28 steps; cachec scales them all.
    theirs = cache_dit.steps_mask(total_steps=16, mask_policy="fast")
    ours = steps_mask(total_steps=16, mask_policy="fast")
    assert as_str(theirs) == "1111100000000001" and max(runs(theirs, 0)) == 10
    assert max(runs(ours, 0)) <= run_bound("fast", 16) == 3
    assert sum(ours) == sum(theirs) == 6
