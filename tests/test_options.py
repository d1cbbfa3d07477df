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
    assert parse_options({"strategy": "DiTango"}).cache_config.cache_type == "DiTango"
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
    with pytest.raises(ValueError, match="steps_computation_mask='fast' is invalid: a named mask goes in "
                                         "scm_steps_mask_policy='fast'"):
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


FAST_28 = "111111" "0" "1" "000" "1" "0000" "1" "00000" "1" "0000" "1"   # cache-dit's bins, written out


def test_named_scm_masks_spelled_as_vllm_omni_spells_them():
    c = parse_options({"scm_steps_mask_policy": "fast", "scm_steps_policy": "static",
                       "num_inference_steps": 28}).cache_config
    assert "".join(map(str, c.steps_mask_for(28))) == FAST_28 and c.steps_computation_policy == "static"
    assert c.warmup_steps() == frozenset(range(4))   # the mask's leading 1s do not cut warmup 4
    assert c.short_name().endswith("_SCMfast_static")
    assert len(c.steps_mask_for(50)) == 50   # a refresh to another step count scales the mask
    with pytest.raises(ValueError, match="scm_steps_mask_policy='fast' needs num_inference_steps"):
        parse_options({"scm_steps_mask_policy": "fast"})
    with pytest.raises(ValueError, match=r"scm_steps_mask_policy='quick'.*\('slow', 'medium', 'fast', 'ultra'\)"):
        parse_options({"scm_steps_mask_policy": "quick", "num_inference_steps": 28})
    with pytest.raises(ValueError, match="scm_steps_policy='dynamic' contradicts steps_computation_policy='static'"):
        parse_options({"scm_steps_mask_policy": "fast", "num_inference_steps": 28, "scm_steps_policy": "dynamic",
                       "steps_computation_policy": "static"})
    with pytest.raises(ValueError, match="pass either an explicit mask or a named one"):
        parse_options({"scm_steps_mask_policy": "fast", "steps_computation_mask": [1, 0, 1]})


PRUNE_ONLY = {"non_prune_block_ids": [1], "enable_dynamic_prune_threshold": True,
              "dynamic_prune_threshold_relax_ratio": 1.5, "max_dynamic_prune_threshold": 0.2}


def test_dbprune_by_cache_type_or_typed_config():
    flat = parse_options({"cache_type": "DBPrune", "residual_diff_threshold": 0.05, **PRUNE_ONLY}).cache_config
    typed = cachec.DBPruneConfig(residual_diff_threshold=0.05, **PRUNE_ONLY)
    assert flat == typed and parse_options({"cache_config": typed}).cache_config is typed
    assert parse_options({"cache_config": {"cache_type": "dbprune", **PRUNE_ONLY}}).cache_config == \
        cachec.DBPruneConfig(**PRUNE_ONLY)
    assert typed.non_prune_block_ids == (1,) and typed.short_name().startswith("DBPrune_F1B0")
    assert cachec.DBPruneConfig().residual_diff_threshold == 0.08 and cachec.DBPruneConfig().max_dynamic_threshold() == 0.16
    assert type(parse_options({"cache_type": "DBCache"}).cache_config) is cachec.DBCacheConfig


@given(key=st.sampled_from(sorted(PRUNE_ONLY)))
def test_prune_keys_without_cache_type_say_how_to_prune(key):
    with pytest.raises(ValueError, match=f"option '{key}' is a DBPrune option: add cache_type='DBPrune'"):
        parse_options({key: PRUNE_ONLY[key]})


@given(value=st.one_of(st.text(max_size=4), st.integers(), st.none()))
def test_cache_type_names_the_strategies(value):
    if isinstance(value, str) and value.lower() in ("dbcache", "dbprune", "teacache", "pab", "ditango"):
        assert parse_options({"cache_type": value}).cache_config.cache_type.lower() == value.lower()
        return
    with pytest.raises(ValueError, match=r"cache_type=.* expected one of \['DBCache', 'DBPrune', 'TeaCache', 'PAB', 'DiTango'\]"):
        parse_options({"cache_type": value})


@given(ids=st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.text(max_size=2), st.integers()))
def test_non_prune_block_ids_are_block_indices(ids):
    if isinstance(ids, list) and all(i >= 0 for i in ids):
        assert cachec.DBPruneConfig(non_prune_block_ids=ids).non_prune_block_ids == tuple(ids)
    else:
        with pytest.raises(ValueError, match="non_prune_block_ids=.*block indices"):
            cachec.DBPruneConfig(non_prune_block_ids=ids)


def test_dynamic_prune_knobs_need_the_switch():
    with pytest.raises(ValueError, match="dynamic_prune_threshold_relax_ratio=2 needs enable_dynamic_prune_threshold"):
        cachec.DBPruneConfig(dynamic_prune_threshold_relax_ratio=2)


def test_calibrator_config_typed_dict_or_flat():
    ts = cachec.TaylorSeerCalibratorConfig(taylorseer_order=2)
    assert parse_options({"calibrator_config": ts}).cache_config.calibrator() == ts
    assert parse_options({"calibrator_config": {"calibrator_type": "taylorseer", "taylorseer_order": 2}}) \
        .cache_config.calibrator() == ts
    assert parse_options({"enable_taylorseer": True, "taylorseer_order": 2}).cache_config.calibrator() == ts
    foca = parse_options({"calibrator_config": {"calibrator_type": "FoCa"}}).cache_config
    assert foca.calibrator() == cachec.FoCaCalibratorConfig() and foca.short_name().endswith("_FoCa")
    off = cachec.FoCaCalibratorConfig(enable_calibrator=False, enable_encoder_calibrator=False)
    assert cachec.DBCacheConfig(calibrator_config=off).calibrator() is None
    with pytest.raises(ValueError, match=r"calibrator_type='dmd', expected one of \('taylorseer', 'foca'\)"):
        parse_options({"calibrator_config": {"calibrator_type": "dmd"}})
    with pytest.raises(ValueError, match="unknown option 'taylorseer_order' of calibrator_config"):
        parse_options({"calibrator_config": {"calibrator_type": "foca", "taylorseer_order": 2}})
    with pytest.raises(ValueError, match="enable_taylorseer=True and calibrator_config=.* are both given"):
        parse_options({"enable_taylorseer": True, "calibrator_config": cachec.FoCaCalibratorConfig()})
    with pytest.raises(ValueError, match="calibrator_config=3 is invalid"):
        parse_options({"calibrator_config": 3})


def test_cache_dits_own_calibrator_configs_are_accepted():
    cache_dit = pytest.importorskip("cache_dit")
    c = parse_options({"calibrator_config": cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2)}).cache_config
    assert c.calibrator() == cachec.TaylorSeerCalibratorConfig(taylorseer_order=2)
    c = parse_options({"calibrator_config": cache_dit.FoCaCalibratorConfig()}).cache_config
    assert c.calibrator() == cachec.FoCaCalibratorConfig()


# ------------------------------------------------------------------------------------ inductor options

def test_inductor_options_are_validated_like_every_other_option():
    assert parse_options({"inductor": {"max_autotune": True, "epilogue_fusion": False}}).inductor == \
        {"max_autotune": True, "epilogue_fusion": False}
    with pytest.raises(ValueError, match=r"inductor option 'max_autotun' is unknown.*did you mean 'max_autotune'"):
        parse_options({"inductor": {"max_autotun": True}})
    with pytest.raises(ValueError, match=r"inductor option max_autotune=1 is invalid: expected a bool"):
        parse_options({"inductor": {"max_autotune": 1}})
    with pytest.raises(ValueError, match=r"inductor=\['max_autotune'\] is invalid: expected a dict"):
        parse_options({"inductor": ["max_autotune"]})
    with pytest.raises(ValueError, match=r"needs inner_backend='inductor' \(it is 'eager'\)"):
        parse_options({"inductor": {"max_autotune": True}, "inner_backend": "eager"})


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["epilogue_fusion", "coordinate_descent_tuning", "max_autotune", "freezing"]),
       value=st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3), st.none()))
def test_inductor_bool_options_take_bools_only(name, value):
    if isinstance(value, bool):
        assert parse_options({"inductor": {name: value}}).inductor == {name: value}
    else:
        with pytest.raises(ValueError, match=f"inductor option {name}=.* expected a bool"):
            parse_options({"inductor": {name: value}})
