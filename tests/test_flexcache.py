"""FlexCache's one knob (strategy, cache_ratio, warmup, cooldown) and TeaCache.

References: FlexCache's validation rules and mappings restated by hand; for TeaCache,
the modulated input read from the eager model's own adaptive norm (``norm1``) and
the accumulate-and-reset rule restated here; on the toy, outputs worked out by hand.
"""
import logging
import os
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cachec
from cachec.options import TEACACHE_COEFFICIENTS, parse_options

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402
from test_syncs import per_call_syncs  # noqa: E402
from toy import ToyDiT, _run  # noqa: E402

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


# --------------------------------------------------------------------------------------- options

@given(c=st.floats(-0.5, 1.5, allow_nan=False), warmup=st.integers(-1, 6), cooldown=st.integers(-1, 6),
       n=st.one_of(st.none(), st.integers(1, 12)), strategy=st.sampled_from(["teacache", "TeaCache", "dbcache", "DBCACHE"]))
def test_flex_options_follow_flexcache_rules_and_mappings(c, warmup, cooldown, n, strategy):
    opts = {"strategy": strategy, "cache_ratio": c, "warmup": warmup, "cooldown": cooldown}
    if n is not None:
        opts["num_inference_steps"] = n
    if not 0 <= c <= 1:
        with pytest.raises(ValueError, match=r"cache_ratio=.* must be in \[0, 1\]"):
            parse_options(opts)
    elif warmup < 0 or cooldown < 0:
        with pytest.raises(ValueError, match=r"(warmup|cooldown)=-1 is invalid: expected an int >= 0"):
            parse_options(opts)
    elif n is not None and warmup + cooldown >= n:
        with pytest.raises(ValueError, match=r"warmup \+ cooldown < num_inference_steps"):
            parse_options(opts)
    else:
        o = parse_options(opts)
        cfg = o.cache_config
        assert o.flex.strategy == strategy.lower()
        assert cfg.max_warmup_steps == warmup and cfg.cooldown == cooldown and cfg.num_inference_steps == n
        assert cfg.residual_diff_threshold == pytest.approx(0.08 + c * 0.27, abs=1e-6)   # rounded to 6 places
        if strategy.lower() == "teacache":
            assert isinstance(cfg, cachec.TeaCacheConfig) and cfg.Fn_compute_blocks == 0
            assert cfg.max_continuous_cached_steps == -1
        else:
            assert (cfg.Fn_compute_blocks, cfg.Bn_compute_blocks) == (1, 0)
            assert cfg.max_continuous_cached_steps == 1 + round(4 * c)


@pytest.mark.parametrize("options, message", [
    ({"cache_type": "DiTango", "self_attention_range": 2}, r"self_attention_range=2 does not apply to DiTango"),
    ({"strategy": "ditango", "head_groups": 2}, r"\['head_groups'\] contradict the FlexCache options"),
    ({"cache_type": "PAB", "enable_taylorseer": True}, r"PAB reuses attention outputs as they were"),
    ({"strategy": "tea"}, r"strategy='tea' is invalid: expected one of \('dbcache', 'teacache', 'pab', 'ditango'\)"),
    ({"cache_ratio": "0.5"}, r"cache_ratio='0.5' is invalid"),
    ({"flexcache": "teacache", "strategy": "dbcache"}, r"two names for one setting"),
    ({"flexcache": 3}, r"flexcache=3 is invalid: expected a strategy name"),
    ({"flexcache": None, "cache_ratio": 0.5}, r"flexcache=None turns caching off"),
    ({"strategy": "teacache", "Fn_compute_blocks": 2}, r"\['Fn_compute_blocks'\] contradict the FlexCache options"),
    ({"strategy": "dbcache", "teacache_coefficients": [1.0, 0.0]}, r"teacache_coefficients=.*needs strategy='teacache'"),
    ({"strategy": "teacache", "output_dir": "out"}, r"output_dir='out' needs strategy='ditango'"),
    ({"cache_type": "TeaCache", "Fn_compute_blocks": 1}, r"Fn_compute_blocks=1 is invalid for TeaCache"),
])
def test_flex_option_errors_name_the_rule(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


def test_legacy_spellings_and_typed_configs():
    legacy = parse_options({"flexcache": "TeaCache"})
    assert legacy.flex == cachec.FlexCacheConfig() and legacy.cache_config == cachec.FlexCacheConfig().resolve()
    assert legacy.cache_config.residual_diff_threshold == pytest.approx(0.08 + 0.25 * 0.27)   # documented default
    assert parse_options({"flexcache": None}).cache_config is None
    typed = cachec.FlexCacheConfig(strategy="DBCache", cache_ratio=1.0, warmup=2, cooldown=0)
    assert parse_options({"cache_config": typed}).cache_config == typed.resolve()
    assert parse_options({"flexcache": typed}).flex == typed
    tea = parse_options({"cache_type": "TeaCache", "cooldown": 2, "teacache_coefficients": [2.0, 0.0]}).cache_config
    assert tea.cooldown == 2 and tea.rescale("FluxTransformer2DModel") == (2.0, 0.0)
    assert cachec.TeaCacheConfig().rescale("FluxTransformer2DModel") == TEACACHE_COEFFICIENTS["FluxTransformer2DModel"]
    assert cachec.TeaCacheConfig().rescale("WanTransformer3DModel") == (1.0, 0.0)


# ------------------------------------------------------------------------------ switches that turn it off

def _toy_outputs(compiled, model, steps=4):
    with torch.no_grad():
        for i in range(steps):
            x, t = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(i)), torch.tensor([900.0 - 100 * i])
            torch.testing.assert_close(compiled(x, t)[0], model(x, t)[0], rtol=0, atol=0)


def _compile_toy(**options):
    torch._dynamo.reset()
    model = ToyDiT()
    return model, torch.compile(model, backend="cachec", options={"inner_backend": "eager", **options})


def test_flexcache_none_compiles_plainly():
    model, compiled = _compile_toy(flexcache=None)
    _toy_outputs(compiled, model)
    with pytest.raises(ValueError, match="has no cachec state"):
        cachec.summary(compiled)


@pytest.mark.parametrize("how", ["env", "function"])
def test_process_switch_compiles_plainly_and_says_so_once(how, monkeypatch, caplog):
    import cachec.compile_configs as cc
    monkeypatch.setitem(cc._switch, "logged", False)
    monkeypatch.setitem(cc._switch, "enabled", None)
    if how == "env":
        monkeypatch.setenv("CACHEC_ENABLE", "0")
    else:
        cachec.set_enabled(False)
    assert not cachec.is_enabled()
    with caplog.at_level(logging.WARNING, logger="cachec"):
        for _ in range(2):
            model, compiled = _compile_toy(strategy="teacache", cache_ratio=1.0)
            _toy_outputs(compiled, model)
            with pytest.raises(ValueError, match="has no cachec state"):
                cachec.summary(compiled)
    said = [r.getMessage() for r in caplog.records if r.name == "cachec"]
    assert len(said) == 1 and "caching is off for this process" in said[0]
    assert ("CACHEC_ENABLE=0" if how == "env" else "set_enabled(False)") in said[0]
    cachec.set_enabled(None)
    monkeypatch.setenv("CACHEC_ENABLE", "1")
    assert cachec.is_enabled()
    monkeypatch.setenv("CACHEC_ENABLE", "maybe")
    with pytest.raises(ValueError, match="CACHEC_ENABLE='maybe' is invalid"):
        cachec.is_enabled()
    with pytest.raises(ValueError, match=r"set_enabled\('no'\) is invalid"):
        cachec.set_enabled("no")


# --------------------------------------------------------------------------------------- TeaCache

def _drifting(case, steps: int, rate: float) -> list:
    """A slowly moving latent per step, as in denoising, fixed in advance: what a step sees does
    not depend on what earlier steps cached."""
    start, drift = case.inputs(1.0, seed=0)[case.latent_key], case.inputs(1.0, seed=1)[case.latent_key]
    return [start + rate * s * drift for s in range(steps)]


def _teacache_decisions(diffs: dict, steps: int, threshold: float, poly, warmup: int, cooldown: int) -> list[int]:
    """TeaCache by hand: the computed steps, from the change of each step against the one before."""
    computed, acc = [], 0.0
    for s in range(steps):
        if s > 0:
            acc += sum(c * diffs[s] ** (len(poly) - 1 - i) for i, c in enumerate(poly))
        if s < warmup or s >= steps - cooldown or acc >= threshold:
            computed.append(s)
            acc = 0.0
    return computed


@pytest.mark.parametrize("name", ["flux", "sd3", "cogvideox"])
def test_teacache_measures_the_adaptive_norm_output_and_decides_as_teacache(name):
    """The latent fed at each step is fixed in advance, so the modulated inputs (and the
    decisions) do not depend on what was cached: the eager model's ``norm1`` output gives them."""
    case = tiny_models.build(name)
    steps, threshold = 8, 0.4
    ts = [1 - i / steps for i in range(steps)]
    latents = _drifting(case, steps, 0.02)
    block0 = next(m for n, m in case.model.named_modules() if n.endswith(".0") and hasattr(m, "norm1"))
    seen = []
    hook = block0.norm1.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    with torch.no_grad():
        want = [case.latent_of(case.model(**case.with_latent(case.inputs(t), x))) for t, x in zip(ts, latents)]
    hook.remove()
    ref = {s: ((seen[s] - seen[s - 1]).abs().mean() / seen[s - 1].abs().mean()).item() for s in range(1, steps)}
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "cache_type": "TeaCache", "residual_diff_threshold": threshold,
        "num_inference_steps": steps, "max_warmup_steps": 1, "cooldown": 1})
    with torch.no_grad():
        got = [case.latent_of(compiled(**case.with_latent(case.inputs(t), x))) for t, x in zip(ts, latents)]
    s = cachec.summary(compiled)
    assert s.strategy == "TeaCache" and s.segments[0] == ("fn", []) and "block" in s.gate_input
    for k in ref:
        assert s.residual_diffs[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7)
    poly = TEACACHE_COEFFICIENTS.get(type(case.model).__name__, (1.0, 0.0))
    expected = _teacache_decisions(ref, steps, threshold, poly, 1, 1)
    assert s.computed_steps == expected and len(expected) < steps
    for k in range(steps):
        if k in expected:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        else:
            assert not torch.equal(got[k], want[k])


def test_teacache_falls_back_to_the_block_input_with_a_warning():
    """The toy has no adaptive norm: the gate measures the hidden states entering block 0, and a
    cached step is its input plus the chain's residual at the last computed step, worked out by hand."""
    model, compiled = _compile_toy(cache_type="TeaCache", residual_diff_threshold=0.5, num_inference_steps=8,
                                   cooldown=1)
    xs = [torch.full((1, 4, 8), 1.0 + 0.1 * i) + 0.01 * torch.arange(8.0) for i in range(8)]
    ts = [torch.tensor([900.0 - 100 * i]) for i in range(8)]
    with pytest.warns(cachec.CachecWarning, match="measures the hidden states entering the first block instead"), \
            torch.no_grad():
        got = [compiled(x, t)[0] for x, t in zip(xs, ts)]
    s = cachec.summary(compiled)
    diffs = {k: ((xs[k] - xs[k - 1]).abs().mean() / xs[k - 1].abs().mean()).item() for k in range(1, 8)}
    computed = _teacache_decisions(diffs, 8, 0.5, (1.0, 0.0), 1, 1)
    assert s.computed_steps == computed and len(computed) < 8
    with torch.no_grad():
        for k in range(8):
            if k in computed:   # the whole chain runs; its residual is kept for the steps after
                residual = _run(model.blocks, xs[k], model.temb(ts[k])) - xs[k]
            torch.testing.assert_close(got[k], xs[k] + residual, rtol=1e-6, atol=1e-6)


def test_teacache_reads_the_host_once_per_call_and_never_recompiles():
    _, compiled = _compile_toy(cache_type="TeaCache", residual_diff_threshold=0.5, num_inference_steps=6, cooldown=1)
    ts = [torch.tensor([900.0 - 100 * i]) for i in range(6)]
    xs = [torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(b)) for b in range(2)]   # two CFG branches
    with pytest.warns(cachec.CachecWarning):
        per_call_syncs(compiled, ts, xs)
    with torch.compiler.set_stance("fail_on_recompile"):
        counts = per_call_syncs(compiled, ts, xs)
    s = cachec.summary(compiled)
    assert max(counts) == 1 and s.generation == 1 and len(s.branches) == 2 and s.cached_steps


# ------------------------------------------------------------------------- the knob on the trained model

STEPS = 16


@pytest.fixture(scope="module")
def digits_model():
    sys.path.insert(0, BENCH)
    import digits
    transformer, conditioner = digits.load_model()
    runs: dict = {}

    def computed(strategy: str, ratio: float, warmup: int = 2, cooldown: int = 2, **extra) -> dict:
        """Per branch, the steps that computed everything; with ``work``, how many regions ran
        over the generation (PAB, DiTango: attention outputs or head groups)."""
        key = (strategy, ratio, warmup, cooldown, tuple(sorted(extra.items())))
        if key not in runs:
            torch._dynamo.reset()
            compiled = torch.compile(transformer, backend="cachec", options={
                "inner_backend": "eager", "strategy": strategy, "cache_ratio": ratio, "warmup": warmup,
                "cooldown": cooldown, "num_inference_steps": STEPS, **extra})
            digits.sample(transformer, conditioner, list(range(10)), steps=STEPS, transformer_call=compiled)
            s = cachec.summary(compiled)
            runs[key] = {n: list(b.computed_steps) for n, b in s.branches.items()}
            runs[key]["work"] = {n: sum(sum(ran.values()) for ran in b.block_map.values()) or len(b.computed_steps)
                                 for n, b in s.branches.items()}
        return runs[key]
    return computed


@settings(max_examples=8, deadline=None)
@given(strategy=st.sampled_from(["teacache", "pab", "ditango", "dbcache"]), a=st.floats(0, 1), b=st.floats(0, 1))
def test_a_higher_cache_ratio_never_computes_more(digits_model, strategy, a, b):
    lo, hi = sorted((round(a, 1), round(b, 1)))
    more, fewer = digits_model(strategy, lo)["work"], digits_model(strategy, hi)["work"]
    assert set(more) == set(fewer) == {"cond", "uncond"}
    for branch in more:
        assert fewer[branch] <= more[branch], (strategy, lo, hi, more, fewer)


@pytest.mark.parametrize("strategy", ["teacache", "pab", "ditango", "dbcache"])
def test_warmup_and_cooldown_steps_always_compute(digits_model, strategy):
    runs = digits_model(strategy, 1.0, warmup=3, cooldown=2)
    runs = {n: v for n, v in runs.items() if n != "work"}
    for branch, computed in runs.items():
        assert {0, 1, 2, STEPS - 2, STEPS - 1} <= set(computed), (branch, computed)
        assert len(computed) < STEPS
    # without them the same knob caches some of those steps
    bare = digits_model(strategy, 1.0, warmup=1, cooldown=0)
    assert any(not {1, 2, STEPS - 2, STEPS - 1} <= set(c) for n, c in bare.items() if n != "work"), bare


# -------------------------------------------------------------------------------------------- PAB

def _pab_reference(case, ts, latents, attn_modules: dict, computes: dict):
    """The eager model with each attention module's output reused, by a forward hook, on the
    steps its schedule (``computes[name]``: the steps it computes) leaves out."""
    stored, step = {}, {"now": 0}

    def hook(name):
        def reuse(module, args, out):
            if step["now"] in computes[name]:
                stored[name] = out
                return out
            return stored[name]
        return reuse
    hooks = [m.register_forward_hook(hook(n)) for n, m in attn_modules.items()]
    try:
        outs = []
        with torch.no_grad():
            for s, (t, x) in enumerate(zip(ts, latents)):
                step["now"] = s
                outs.append(case.latent_of(case.model(**case.with_latent(case.inputs(t), x))))
        return outs
    finally:
        for h in hooks:
            h.remove()


def _every(steps: int, every: int, warmup: int, cooldown: int) -> list[int]:
    """PAB's schedule by hand: warmup and cooldown compute, then once every ``every`` steps."""
    out, last = [], None
    for s in range(steps):
        if s < warmup or s >= steps - cooldown or every < 2 or s - last >= every:
            out.append(s)
            last = s
    return out


@pytest.mark.parametrize("name, kinds", [
    ("pixart", {"attn1": "self", "attn2": "cross"}), ("wan", {"attn1": "self", "attn2": "cross"}),
    ("flux", {"attn": "self"})])
def test_pab_broadcasts_each_attention_output_on_its_schedule(name, kinds):
    """Outputs against the eager model whose attention modules reuse their outputs by hooks
    on the hand-worked schedule; cachec finds the attentions and their kinds by data flow."""
    case = tiny_models.build(name)
    steps, self_every, cross_every = 9, 2, 3
    ts = [1 - i / steps for i in range(steps)]
    latents = _drifting(case, steps, 0.05)
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "cache_type": "PAB", "self_attention_range": self_every,
        "cross_attention_range": cross_every, "num_inference_steps": steps})
    with torch.no_grad():
        got = [case.latent_of(compiled(**case.with_latent(case.inputs(t), x))) for t, x in zip(ts, latents)]
    modules = {n: m for n, m in case.model.named_modules() if n.rsplit(".", 1)[-1] in kinds
               and n.count(".") == 2}
    schedule = {n: _every(steps, self_every if kinds[n.rsplit(".", 1)[-1]] == "self" else cross_every, 1, 1)
                for n in modules}
    want = _pab_reference(case, ts, latents, modules, schedule)
    s = cachec.summary(compiled)
    block_map = s.branches[list(s.branches)[0]].block_map
    expected = {f"{n.rsplit('.', 1)[0]} {kinds[n.rsplit('.', 1)[-1]]}-attention": sched for n, sched in schedule.items()}
    assert {k: [st for st, ran in v.items() if ran] for k, v in block_map.items()} == expected
    assert s.strategy == "PAB" and "broadcast" in str(s)
    for k in range(steps):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    k = s.cached_steps[0]   # a broadcast step really reused: it differs from the uncached model
    with torch.no_grad():
        plain = case.latent_of(case.model(**case.with_latent(case.inputs(ts[k]), latents[k])))
    assert not torch.allclose(got[k], plain, rtol=1e-5, atol=1e-5)


def test_pab_from_the_knob_never_divides_by_zero():
    for c, (self_every, cross_every) in {0.0: (0, 0), 0.04: (0, 0), 0.05: (0, 0), 0.25: (2, 3), 1.0: (10, 17)}.items():
        cfg = cachec.FlexCacheConfig(strategy="PAB", cache_ratio=c).resolve()
        assert (cfg.self_attention_range, cfg.cross_attention_range) == (self_every, cross_every)
    assert _every(6, 0, 1, 1) == list(range(6))
    with pytest.raises(ValueError, match="residual_diff_threshold=0.1 does not apply to PAB"):
        cachec.PABConfig(residual_diff_threshold=0.1)


# ---------------------------------------------------------------------------------------- DiTango

def _ditango_reference(case, ts, latents, c, groups, warmup=1, cooldown=1):
    """DiTango restated on the eager model: ``F.scaled_dot_product_attention`` is patched to run
    per group of heads, measure each group's query change since it last computed (the call
    order names the attention), and reuse the outputs of the groups the rule leaves out.
    Returns the outputs and the computed map {(attention call, group): [steps]}."""
    import torch.nn.functional as F
    original = F.scaled_dot_product_attention
    steps = len(ts)
    refs, stored, history, recent, before = {}, {}, [], {}, {}
    pending, decision, computed = None, {}, {}
    now = {"call": 0}

    def patched(query, key, value, attn_mask=None, **kw):
        i = now["call"]
        now["call"] += 1
        heads = query.shape[1]
        g = max(d for d in range(1, min(groups, heads) + 1) if heads % d == 0)
        size = heads // g
        if i in refs:
            diff = (query - refs[i]).abs().sum(dim=(0, 2, 3)).view(g, size).sum(1)
            base = refs[i].abs().sum(dim=(0, 2, 3)).view(g, size).sum(1)
            rows.extend(zip(diff.tolist(), base.tolist()))
        else:
            refs[i] = query.clone()
            rows.extend([(0.0, 0.0)] * g)
        outs = []
        for j in range(g):
            sl = (slice(None), slice(j * size, (j + 1) * size))
            if decision.get((i, j), True) or (i, j) not in stored:
                mask = attn_mask[sl] if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == heads \
                    else attn_mask
                stored[(i, j)] = original(query[sl], key[sl], value[sl], attn_mask=mask, **kw)
                refs[i][sl] = query[sl]
            outs.append(stored[(i, j)])
        return torch.cat(outs, dim=1)

    outputs = []
    F.scaled_dot_product_attention = patched
    try:
        with torch.no_grad():
            for s, (t, x) in enumerate(zip(ts, latents)):
                estimate = {}
                if pending is not None and s > 0:
                    for r, (d, b) in zip(sorted(stored), pending):
                        e = d / b if b else 0.0
                        if e > 0:
                            history.append(e)
                        last = recent.get(r)
                        if last == s - 1:
                            estimate[r] = e / max(1, last - before.get(r, last - 1))
                        elif last is not None:
                            n = max(1, s - 1 - last)
                            estimate[r] = e * (n + 1) / n
                forced = s < warmup or s >= steps - cooldown or s == 0 or c <= 0 or not estimate or not history
                mean = sum(estimate.values()) / len(estimate) if estimate else 0.0
                if forced or mean > 0.6 * c:
                    decision = {r: True for r in stored}
                else:
                    tau = sorted(history)[min(len(history) - 1, int(c * len(history)))]
                    decision = {r: not (r in estimate and estimate[r] < tau) for r in stored}
                for r, compute in decision.items():
                    if compute:
                        before[r], recent[r] = recent.get(r, s - 1), s
                        computed.setdefault(r, []).append(s)
                now["call"], rows = 0, []
                outputs.append(case.latent_of(case.model(**case.with_latent(case.inputs(t), x))))
                pending = rows
                if s == 0:   # the regions are known after the first call
                    for r in stored:
                        recent[r], computed[r] = 0, [0]
    finally:
        F.scaled_dot_product_attention = original
    return outputs, computed


@pytest.mark.parametrize("name", ["pixart", "flux", "wan"])
def test_ditango_reuses_head_groups_as_the_rule_says(name):
    case = tiny_models.build(name)
    steps, c, groups = 10, 0.5, 2
    ts = [1 - i / steps for i in range(steps)]
    latents = _drifting(case, steps, 0.05)
    want, computed = _ditango_reference(case, ts, latents, c, groups)
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "strategy": "ditango", "cache_ratio": c, "num_inference_steps": steps})
    with torch.no_grad():
        got = [case.latent_of(compiled(**case.with_latent(case.inputs(t), x))) for t, x in zip(ts, latents)]
    s = cachec.summary(compiled)
    block_map = s.branches[list(s.branches)[0]].block_map
    ran = [[st for st, r in v.items() if r] for v in block_map.values()]   # graph order = call order
    assert ran == [computed[r] for r in sorted(computed)]
    assert any(len(r) < steps for r in ran), ran   # something was reused
    for k in range(steps):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_ditango_at_ratio_0_computes_everything_exactly():
    case = tiny_models.build("pixart")
    ts = [1 - i / 5 for i in range(5)]
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "strategy": "DiTango", "cache_ratio": 0.0, "num_inference_steps": 5})
    with torch.no_grad():
        for t in ts:
            kw = case.inputs(t)
            torch.testing.assert_close(compiled(**kw)[0], case.model(**kw)[0], rtol=1e-6, atol=1e-6)
    assert cachec.summary(compiled).computed_steps == list(range(5))


def test_ditango_writes_its_decision_map(tmp_path, digits_model):
    runs = digits_model("ditango", 0.75, output_dir=str(tmp_path))
    assert runs["cond"] and runs["cond"] == runs["uncond"]   # one decision for both CFG branches
    ppm = (tmp_path / "ditango_policy_step_layer_group.ppm").read_bytes()
    header, width, height = ppm.split(b"\n")[0], *map(int, ppm.split(b"\n")[1].split())
    assert header == b"P6" and height == STEPS and width == 8 * 2   # 8 layers x 2 head groups
    png = (tmp_path / "ditango_policy_step_layer_group.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"IEND" in png
    body = ppm[-3 * width * height:]
    first_row = {tuple(body[i:i + 3]) for i in range(0, 3 * width, 3)}
    from cachec.runtime.policy_map import COLOURS
    assert first_row == {COLOURS["anchor"]}   # step 0 is warmup: everything computes
    assert tuple(COLOURS["reused"]) in {tuple(body[i:i + 3]) for i in range(0, len(body), 3)}


@pytest.mark.parametrize("strategy", ["pab", "ditango"])
def test_attention_regions_compile_through_aot_autograd(strategy):
    """A chunk of the modulation (a tuple) made before an attention region and read after it must
    not cross segments as a tuple: AOTAutograd rejects such a segment output (seen on FLUX)."""
    _inner_backends_agree(strategy, "aot_eager", steps=4, ratio=0.3, tol=1e-5)


def _inner_backends_agree(strategy: str, inner: str, steps: int, ratio: float, tol: float) -> None:
    """Tiny FLUX under ``strategy`` gives the same outputs through ``inner`` as through the eager
    inner backend, and caches something with both."""
    case = tiny_models.build("flux")
    ts = [1 - i / steps for i in range(steps)]
    outs = {}
    for backend in ("eager", inner):
        torch._dynamo.reset()
        compiled = torch.compile(case.model, backend="cachec", options={
            "inner_backend": backend, "strategy": strategy, "cache_ratio": ratio, "num_inference_steps": steps})
        with torch.no_grad():
            outs[backend] = [compiled(**case.inputs(t))[0] for t in ts]
        assert cachec.summary(compiled).cached_steps
    for a, b in zip(outs["eager"], outs[inner]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_cooldown_needs_a_step_count_and_follows_flexcache_rule_when_it_comes():
    model, compiled = _compile_toy(cache_type="TeaCache", residual_diff_threshold=0.5, cooldown=1)
    x = torch.ones(1, 4, 8)
    with pytest.warns(cachec.CachecWarning, match="cooldown=1 needs the generation's step count"), torch.no_grad():
        compiled(x, torch.tensor([900.0]))   # a warmup step
        compiled(x, torch.tensor([800.0]))
    rule = r"warmup=1 \+ cooldown=1 must be < num_inference_steps=2"   # nothing left to cache
    with pytest.raises(ValueError, match=rule):
        cachec.refresh(compiled, num_inference_steps=2)
    with pytest.raises(ValueError, match=rule), torch.no_grad():   # a pipeline that names the step count
        for i in range(2):
            with model.cache_context("cond", step_index=i, num_inference_steps=2):
                compiled(x, torch.tensor([900.0 - 100 * i]))


def _tiny_latte():
    """A tiny Latte: spatial blocks (self + cross attention over one frame's tokens) interleaved with
    temporal blocks (self-attention over frames, the tokens folded into the batch)."""
    from diffusers import LatteTransformer3DModel
    torch.manual_seed(0)
    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=16,
        video_length=3, num_embeds_ada_norm=1000).eval()
    enc = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))

    class Case:   # the slice of tiny_models.TinyCase the helpers above use
        latent_key = "hidden_states"

        def inputs(self, t, seed=0):
            return {"hidden_states": torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),
                    "timestep": torch.tensor([int(1000 * t)]), "encoder_hidden_states": enc, "return_dict": False}

        def with_latent(self, kw, x):
            return {**kw, "hidden_states": x}

        def latent_of(self, out):
            return out[0]
    case = Case()
    case.model = model
    return case


def test_interleaved_loops_chain_in_graph_order():
    """Latte runs spatial block i, then temporal block i: the chain follows the graph, so each
    block's outputs pair with its own inputs (before, the chain listed the loops one after the
    other, and a block ran uncached with an unproven role)."""
    case = _tiny_latte()
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={"inner_backend": "eager",
                                                                    "residual_diff_threshold": 0.0})
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", cachec.CachecWarning)
        for t in (0.9, 0.8, 0.7):
            kw = case.inputs(t)
            torch.testing.assert_close(compiled(**kw)[0], case.model(**kw)[0], rtol=0, atol=0)
    s = cachec.summary(compiled)
    assert s.blocks == ["transformer_blocks.0", "temporal_transformer_blocks.0", "transformer_blocks.1",
                        "temporal_transformer_blocks.1"]
    assert not s.unproven and not s.unpaired


def test_pab_gives_temporal_attention_its_own_range():
    case = _tiny_latte()
    steps, every = 9, {"self": 2, "temporal": 3, "cross": 4}
    ts = [1 - i / steps for i in range(steps)]
    latents = _drifting(case, steps, 0.05)
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "cache_type": "PAB", "self_attention_range": every["self"],
        "temporal_attention_range": every["temporal"], "cross_attention_range": every["cross"],
        "num_inference_steps": steps})
    with torch.no_grad():
        got = [compiled(**case.with_latent(case.inputs(t), x))[0] for t, x in zip(ts, latents)]
    kinds = {}
    for i in range(2):
        kinds.update({f"transformer_blocks.{i}.attn1": "self", f"transformer_blocks.{i}.attn2": "cross",
                      f"temporal_transformer_blocks.{i}.attn1": "temporal"})
    modules = {n: case.model.get_submodule(n) for n in kinds}
    schedule = {n: _every(steps, every[kind], 1, 1) for n, kind in kinds.items()}
    want = _pab_reference(case, ts, latents, modules, schedule)
    s = cachec.summary(compiled)
    block_map = s.branches[list(s.branches)[0]].block_map
    assert {k: [st for st, ran in v.items() if ran] for k, v in block_map.items()} == {
        f"{n.rsplit('.', 1)[0]} {kinds[n]}-attention": schedule[n] for n in kinds}
    for k in range(steps):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert cachec.FlexCacheConfig(strategy="pab", cache_ratio=0.3).resolve().temporal_attention_range == 4


@pytest.mark.parametrize("strategy", ["teacache", "pab", "ditango", "dbcache"])
def test_every_strategy_reads_the_host_once_per_call_and_never_recompiles(strategy):
    """Two generations of PixArt, the second under ``fail_on_recompile``: at most one host read by
    cachec per call, the same outputs both times (no state leaks from one generation to the next)."""
    from test_syncs import SyncCounter
    case = tiny_models.build("pixart")
    steps = 6
    ts = [1 - i / steps for i in range(steps)]
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", options={
        "inner_backend": "eager", "strategy": strategy, "cache_ratio": 0.6, "num_inference_steps": steps})
    runs, reads = [], []
    for stance in ("default", "fail_on_recompile"):
        with torch.compiler.set_stance(stance), torch.no_grad():
            outs = []
            for t in ts:
                with SyncCounter() as counter:
                    outs.append(compiled(**case.inputs(t))[0])
                reads.append(counter.count)
            runs.append(outs)
    s = cachec.summary(compiled)
    assert max(reads) <= 1 and s.generation == 1 and s.cached_steps, (reads, str(s))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.inductor
@pytest.mark.parametrize("strategy", ["pab", "ditango"])
def test_attention_strategies_through_inductor_match_eager(strategy):
    """The attention regions and the head split compile with inductor (shared blocks on) and give
    the eager inner backend's outputs, computed and reused steps alike."""
    _inner_backends_agree(strategy, "inductor", steps=5, ratio=0.5, tol=1e-4)


@pytest.mark.parametrize("strategy", ["teacache", "pab", "ditango"])
def test_strategies_compile_with_dynamic_shapes(strategy):
    """dynamic=True hands norm eps over as tensors read with .item(): TeaCache measures a value whose
    shape is symbolic (compared after the segment runs; here the hidden states, since the modulated
    input's copy would read eps inside the segment before the chain), and the attention strategies
    cut regions around graphs that dynamo folds those reads out of. Computed steps stay exact."""
    case = tiny_models.build("flux")
    ts = [1 - i / 5 for i in range(5)]
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="cachec", dynamic=True, options={
        "inner_backend": "aot_eager", "strategy": strategy, "cache_ratio": 0.5, "num_inference_steps": 5})
    with torch.no_grad():
        got = [compiled(**case.inputs(t))[0] for t in ts]
        want = [case.model(**case.inputs(t))[0] for t in ts]
    s = cachec.summary(compiled)
    assert s.cached_steps and s.computed_steps, str(s)
    for k in s.computed_steps:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
