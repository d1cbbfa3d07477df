"""Option validation: every bad key or value is a ValueError naming key, value and what is allowed."""
import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cachec
from cachec.options import CACHE_KEYS, parse_options

INT_FIELDS = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 0, "warmup_interval": 1,
              "max_cached_steps": -1, "max_continuous_cached_steps": -1}
BOOL_FIELDS = ("cfg_compute_first", "cfg_diff_compute_separate", "enable_taylorseer")


def test_defaults_are_documented_values():
    c = cachec.DBCacheConfig()
    assert (c.Fn_compute_blocks, c.Bn_compute_blocks, c.residual_diff_threshold, c.max_warmup_steps,
            c.max_continuous_cached_steps) == (1, 0, 0.24, 4, 3)
    assert parse_options(None).inner_backend == "inductor"


def test_flat_keys_and_cache_config_give_the_same_config():
    flat = parse_options({"Fn_compute_blocks": 2, "residual_diff_threshold": 0.1})
    typed = parse_options({"cache_config": cachec.DBCacheConfig(Fn_compute_blocks=2, residual_diff_threshold=0.1)})
    as_dict = parse_options({"cache_config": {"Fn_compute_blocks": 2, "residual_diff_threshold": 0.1}})
    assert flat == typed == as_dict


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        cachec.DBCacheConfig().Fn_compute_blocks = 3


@given(key=st.sampled_from(sorted(INT_FIELDS)), value=st.integers(-50, 50))
def test_int_fields_reject_values_below_their_minimum(key, value):
    if value >= INT_FIELDS[key]:
        assert getattr(cachec.DBCacheConfig(**{key: value}), key) == value
    else:
        with pytest.raises(ValueError, match=rf"{key}={value}.*int >= {INT_FIELDS[key]}"):
            parse_options({key: value})


@given(key=st.sampled_from(sorted(INT_FIELDS) + ["num_inference_steps"]),
       value=st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.booleans()))
def test_int_fields_reject_other_types(key, value):
    with pytest.raises(ValueError, match=key):
        cachec.DBCacheConfig(**{key: value})


@given(value=st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf")), st.text(max_size=2), st.booleans()))
def test_threshold_must_be_a_finite_non_negative_number(value):
    with pytest.raises(ValueError, match="residual_diff_threshold="):
        cachec.DBCacheConfig(residual_diff_threshold=value)


@given(key=st.sampled_from(BOOL_FIELDS), value=st.one_of(st.integers(), st.text(max_size=2), st.none()))
def test_bool_fields_take_only_bools(key, value):
    with pytest.raises(ValueError, match=rf"{key}=.*True or False"):
        cachec.DBCacheConfig(**{key: value})


@given(key=st.sampled_from(CACHE_KEYS), junk=st.text(alphabet="xyz_", min_size=1, max_size=2))
def test_misspelled_keys_get_a_did_you_mean(key, junk):
    bad = key + junk
    with pytest.raises(ValueError, match=rf"unknown option '{bad}'; did you mean '{key}'"):
        parse_options({bad: 1})


def test_unknown_and_planned_keys():
    with pytest.raises(ValueError, match=r"unknown option 'zzz' \(allowed:"):
        parse_options({"zzz": 1})
    with pytest.raises(ValueError, match="'cache_ratio' is not supported yet"):
        parse_options({"cache_ratio": 0.5})
    with pytest.raises(ValueError, match=r"inner_backend='tvm'.*\('inductor', 'aot_eager', 'eager'\)"):
        parse_options({"inner_backend": "tvm"})


@given(mask=st.lists(st.integers(-1, 2), min_size=1, max_size=10), n=st.one_of(st.none(), st.integers(1, 10)))
def test_steps_computation_mask_is_one_0_or_1_per_step(mask, n):
    if any(m not in (0, 1) for m in mask):
        with pytest.raises(ValueError, match=r"steps_computation_mask=.*0 \(cache\) / 1 \(compute\)"):
            cachec.DBCacheConfig(steps_computation_mask=mask, num_inference_steps=n)
    elif n is not None and n != len(mask):
        with pytest.raises(ValueError, match=f"{len(mask)} entries but num_inference_steps={n}"):
            cachec.DBCacheConfig(steps_computation_mask=mask, num_inference_steps=n)
    else:
        c = cachec.DBCacheConfig(steps_computation_mask=mask, num_inference_steps=n, max_warmup_steps=8)
        assert c.steps_computation_mask == tuple(mask) and c.num_inference_steps == len(mask)
        leading = (mask + [0]).index(0)   # warmup is cut to the mask's leading run of 1s
        assert c.warmup_steps() == frozenset(range(min(8, leading)))


def test_steps_computation_policy_and_named_masks():
    with pytest.raises(ValueError, match=r"steps_computation_policy='fixed'.*\('dynamic', 'static'\)"):
        cachec.DBCacheConfig(steps_computation_mask=[1, 0], steps_computation_policy="fixed")
    with pytest.raises(ValueError, match="steps_computation_policy='static' needs a steps_computation_mask"):
        parse_options({"steps_computation_policy": "static"})
    with pytest.raises(ValueError, match="steps_computation_mask='fast' is not supported yet.*explicit list"):
        parse_options({"steps_computation_mask": "fast", "num_inference_steps": 28})
    c = parse_options({"steps_computation_mask": [1, 1, 0, 1], "steps_computation_policy": "static"}).cache_config
    assert c.short_name().endswith("_SCM1101_static")


def test_steps_mask_writes_out_cache_dits_fast_bins():
    # compute 6, cache 1, compute 1, cache 3, compute 1, cache 4, compute 1, cache 5, compute 1, cache 4, compute 1
    want = "111111" "0" "1" "000" "1" "0000" "1" "00000" "1" "0000" "1"
    assert "".join(map(str, cachec.steps_mask([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]))) == want


@settings(deadline=None)
@given(compute=st.lists(st.integers(-1, 4), min_size=1, max_size=5), cache=st.lists(st.integers(-1, 4), max_size=5))
def test_steps_mask_bins(compute, cache):
    if min(compute + cache) < 1 or len(compute) != len(cache) + 1:
        with pytest.raises(ValueError, match="compute_bins=|cache_bins="):
            cachec.steps_mask(compute, cache)
        return
    mask = cachec.steps_mask(compute, cache)
    assert len(mask) == sum(compute) + sum(cache) and sum(mask) == sum(compute) and mask[0] == mask[-1] == 1
    runs = "".join(map(str, mask)).replace("10", "1 0").replace("01", "0 1").split()
    assert [len(r) for r in runs[0::2]] == compute and [len(r) for r in runs[1::2]] == cache
    assert cachec.DBCacheConfig(steps_computation_mask=mask).num_inference_steps == len(mask)


@given(order=st.one_of(st.integers(-3, 6), st.floats(allow_nan=False), st.booleans()), enabled=st.booleans())
def test_taylorseer_order(order, enabled):
    valid = isinstance(order, int) and not isinstance(order, bool) and order >= 1
    if valid and (enabled or order == 1):
        c = cachec.DBCacheConfig(enable_taylorseer=enabled, taylorseer_order=order)
        assert c.short_name().endswith(f"_TaylorSeer_O({order})") == enabled
    else:
        with pytest.raises(ValueError, match=rf"taylorseer_order={re.escape(repr(order))} (is invalid: expected an "
                                             rf"int >= 1|needs enable_taylorseer=True)"):
            cachec.DBCacheConfig(enable_taylorseer=enabled, taylorseer_order=order)


def test_contradictory_settings():
    with pytest.raises(ValueError, match="max_warmup_steps=8 .* num_inference_steps=8"):
        cachec.DBCacheConfig(max_warmup_steps=8, num_inference_steps=8)
    with pytest.raises(ValueError, match="cfg_compute_first=True contradicts enable_separate_cfg=False"):
        cachec.DBCacheConfig(enable_separate_cfg=False, cfg_compute_first=True)
    with pytest.raises(ValueError, match="either flat or inside cache_config"):
        parse_options({"cache_config": cachec.DBCacheConfig(), "Fn_compute_blocks": 2})
    with pytest.raises(ValueError, match="max_accumulated_residual_diff_threshold=0"):
        cachec.DBCacheConfig(max_accumulated_residual_diff_threshold=0)


def test_bad_option_surfaces_on_first_call_of_torch_compile():
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="cachec", options={"Fn_compute_block": 1})
    with pytest.raises(Exception, match="did you mean 'Fn_compute_blocks'"):
        compiled(torch.randn(1, 2))
