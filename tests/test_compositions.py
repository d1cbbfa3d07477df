"""What users stack on a DiT keeps working under cachec: PEFT LoRA, ControlNet, torchao int8 weights.

For each composition:

(a) at ``residual_diff_threshold=0`` the compiled model (or pipeline) gives the uncompiled one's output;
(b) at threshold 1 with 2 warmup steps and at most 2 cached steps in a row, 10 steps compute exactly
    ``COMPUTED`` (worked by hand below) and the output differs from the threshold-0 one;
(c) a second generation with the same inputs under ``fail_on_recompile`` is bit-identical, with the
    same decisions.

Only cachec's public API is used (``torch.compile(..., backend="cachec")``, ``cachec.summary``).
``peft`` and ``torchao`` come with the test extra; their tests skip where a package is missing.
"""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import cachec
from tiny_models import build
from tiny_pipelines import build_flux_controlnet_pipeline, generate

STEPS = 10
TIMESTEPS = [1.0 - i / STEPS for i in range(STEPS)]
EXACT = {"inner_backend": "eager", "residual_diff_threshold": 0.0}
CACHED = {"inner_backend": "eager", "residual_diff_threshold": 1.0, "max_warmup_steps": 2,
          "max_continuous_cached_steps": 2}
# Threshold >= 1 caches every step that is not forced to compute: steps 0 and 1 are warmup, then at
# most 2 cached steps in a row force a compute: 2, 3 cached, 4 computed, 5, 6 cached, 7 computed, 8, 9 cached.
COMPUTED = [0, 1, 4, 7]
CACHED_STEPS = [2, 3, 5, 6, 8, 9]
ALL_STEPS = list(range(STEPS))


def compile_cachec(model, options):
    """``torch.compile`` with cachec after emptying dynamo's cache (the previous compile of ``model`` is dropped)."""
    torch._dynamo.reset()
    return torch.compile(model, backend="cachec", options=options)


def denoise(model, case):
    """10 Euler steps of the tiny FLUX transformer from fixed noise; returns the final latent."""
    x = case.inputs(TIMESTEPS[0])[case.latent_key]
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            v = case.latent_of(model(**case.with_latent(case.inputs(t), x)))
            x = x + ((TIMESTEPS[i + 1] if i + 1 < STEPS else 0.0) - t) * v
    return x


def graphs_compiled():
    """Graphs dynamo has compiled in this process (one per compile or recompile of the transformer's forward).

    ``torch._dynamo.reset()`` does not zero the count: take differences.
    """
    return counters["stats"]["unique_graphs"]


def assert_decisions(model, computed, cached):
    s = cachec.summary(model)
    assert s.steps == STEPS
    assert s.computed_steps == computed and s.cached_steps == cached, str(s)
    assert [(b.computed_steps, b.cached_steps) for b in s.branches.values()] == [(computed, cached)], str(s)


def assert_differs(a, b, what):
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3), what


def assert_cached_and_repeatable(run, model, exact):
    """(b) and (c): decisions, a changed output, and a bit-identical second generation without recompiles.

    ``run()`` runs one generation through the compiled ``model`` (configured with ``CACHED``).
    """
    first = run()
    assert_decisions(model, COMPUTED, CACHED_STEPS)
    assert_differs(first, exact, "cached steps should change the output a little")
    with torch.compiler.set_stance("fail_on_recompile"):
        second = run()
    assert_decisions(model, COMPUTED, CACHED_STEPS)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    return first


# ---------------------------------------------------------------------------------------------------------
# 1. PEFT LoRA adapters on the attention projections
# ---------------------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def lora_case():
    """``build("flux")`` with LoRA adapters "a" (rank 4) and "b" (rank 2), random B weights, "a" active."""
    peft = pytest.importorskip("peft")
    case = build("flux")
    model = case.model
    with warnings.catch_warnings():  # peft warns that a second adapter makes a multi-adapter model
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, rank in (("a", 4), ("b", 2)):
            model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS),
                              adapter_name=name)
    gen = torch.Generator().manual_seed(1)
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b), "peft zero-initialises LoRA B"
    with torch.no_grad():
        for p in lora_b:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v"):
        assert isinstance(model.get_submodule(name), peft.tuners.lora.LoraLayer), name
    model.set_adapters("a")
    return case


def set_lora_state(model, change):
    """``change`` is ``"disable"``, ``"enable"`` or the arguments of ``set_adapters`` (names, weights)."""
    if change == "disable":
        model.disable_adapters()
    elif change == "enable":
        model.enable_adapters()
    else:
        model.set_adapters(*change)


# (label of the adapter state reached, change made); "enable" returns to the state before "disable".
LORA_SWITCHES = [
    ("a", (["a"], None)),
    ("b", (["b"], None)),
    ("a + b/2", (["a", "b"], [1.0, 0.5])),
    ("off", "disable"),
    ("a + b/2", "enable"),
    ("a + 0.8b", (["a", "b"], [1.0, 0.8])),
    ("a", (["a"], None)),
    ("a + b/2", (["a", "b"], [1.0, 0.5])),
    ("b", (["b"], None)),
]


def test_lora_threshold_zero_matches_uncompiled_across_adapter_switches(lora_case):
    """(a) after every set_adapters / disable / enable; a new adapter state recompiles once, a seen one never.

    dynamo guards on peft's adapter state: each LoRA layer's ``active_adapter``, its ``scaling`` floats
    (the adapter weights), ``_disable_adapters`` and the LoRA parameters' ``requires_grad`` (peft turns
    it off for inactive adapters).  So the first generation in a new state recompiles the transformer
    (exactly once in torch 2.13 / peft 0.21.2; the test allows fewer), and a state seen before finds its
    graph in dynamo's cache: under ``fail_on_recompile`` it runs.  Every adapter weight value is a new
    state, so past ``torch._dynamo.config.recompile_limit`` (8) states dynamo runs the forward eagerly
    and cachec no longer caches (dynamo warns "hit config.recompile_limit").
    """
    case, model = lora_case, lora_case.model
    compiled = compile_cachec(model, EXACT)
    references, start = {}, graphs_compiled()  # dynamo's counters outlive torch._dynamo.reset()
    for label, change in LORA_SWITCHES:
        set_lora_state(model, change)
        before = graphs_compiled()
        if label in references:  # the uncompiled model gave references[label] in this state before
            with torch.compiler.set_stance("fail_on_recompile"):
                out = denoise(compiled, case)
            assert graphs_compiled() == before
        else:
            eager = denoise(model, case)
            for other, ref in references.items():
                assert_differs(eager, ref, f"adapter state {label!r} should differ from {other!r}")
            references[label] = eager
            out = denoise(compiled, case)
            assert graphs_compiled() - before <= 1, f"adapter state {label!r} compiled more than one graph"
        torch.testing.assert_close(out, references[label], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")
        assert_decisions(compiled, ALL_STEPS, [])
    assert len(references) == 5
    assert graphs_compiled() - start <= len(references)


def test_lora_caches_the_hand_worked_steps_and_repeats_without_recompiling(lora_case):
    """(b) and (c) with adapter "a"; then "b" (a new state) and back to "a" bit-identical, without recompiling.

    Coming back to "a" after a generation with "b" reproduces the first "a" output bit for bit: nothing
    cached under one adapter leaks into a generation under the other.
    """
    case, model = lora_case, lora_case.model
    exact_a = denoise(compile_cachec(model, EXACT), case)
    compiled = compile_cachec(model, CACHED)
    first_a = assert_cached_and_repeatable(lambda: denoise(compiled, case), compiled, exact_a)

    set_lora_state(model, (["b"], None))
    first_b = denoise(compiled, case)
    assert_decisions(compiled, COMPUTED, CACHED_STEPS)
    assert_differs(first_b, first_a, "adapter b should change the cached output")

    set_lora_state(model, (["a"], None))
    with torch.compiler.set_stance("fail_on_recompile"):
        again_a = denoise(compiled, case)
    assert_decisions(compiled, COMPUTED, CACHED_STEPS)
    torch.testing.assert_close(again_a, first_a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# 2. ControlNet residuals passed into the transformer, through the unchanged FluxControlNetPipeline
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def controlnet_pipe():
    return build_flux_controlnet_pipeline()


def test_controlnet_pipeline_threshold_zero_matches_uncompiled(controlnet_pipe):
    """(a) through the pipeline, at two conditioning scales; a new scale does not recompile."""
    pipe = controlnet_pipe
    original = pipe.transformer
    eager = generate(pipe, STEPS)
    eager_weak = generate(pipe, STEPS, controlnet_conditioning_scale=0.3)
    uncontrolled = generate(pipe, STEPS, controlnet_conditioning_scale=0.0)
    assert_differs(eager, uncontrolled, "the ControlNet residuals should change the image")
    assert_differs(eager, eager_weak, "the conditioning scale should change the image")

    pipe.transformer = compile_cachec(original, EXACT)
    torch.testing.assert_close(generate(pipe, STEPS), eager, rtol=1e-5, atol=1e-5)
    assert_decisions(pipe.transformer, ALL_STEPS, [])
    with torch.compiler.set_stance("fail_on_recompile"):  # the scale only changes the residual tensors
        weak = generate(pipe, STEPS, controlnet_conditioning_scale=0.3)
    torch.testing.assert_close(weak, eager_weak, rtol=1e-5, atol=1e-5)
    assert_decisions(pipe.transformer, ALL_STEPS, [])


def test_controlnet_pipeline_caches_the_hand_worked_steps_and_repeats_without_recompiling(controlnet_pipe):
    """(b) and (c) through the pipeline, ``cachec.summary(pipe.transformer)``."""
    pipe = controlnet_pipe
    original = pipe.transformer
    pipe.transformer = compile_cachec(original, EXACT)
    exact = generate(pipe, STEPS)
    pipe.transformer = compile_cachec(original, CACHED)
    assert_cached_and_repeatable(lambda: generate(pipe, STEPS), pipe.transformer, exact)
    assert cachec.summary(original).computed_steps == COMPUTED


# ---------------------------------------------------------------------------------------------------------
# 3. torchao weight-only int8 quantization
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def int8_case():
    """``build("flux")`` with every Linear's weight int8 (torchao ``Int8WeightOnlyConfig``, per row).

    Returns the case and the latent of the model before quantization.
    ``set_inductor_config=False``: torchao would otherwise change inductor's global config for later tests.
    """
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.utils import TorchAOBaseTensor

    case = build("flux")
    unquantized = denoise(case.model, case)
    quantize_(case.model, Int8WeightOnlyConfig(set_inductor_config=False))
    linears = [m for m in case.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears)
    return case, unquantized


def test_int8_weight_only_threshold_zero_matches_uncompiled_quantized_model(int8_case):
    """(a) against the uncompiled quantized model, which differs from the float one."""
    case, unquantized = int8_case
    eager = denoise(case.model, case)
    assert_differs(eager, unquantized, "int8 weights should change the output a little")
    compiled = compile_cachec(case.model, EXACT)
    torch.testing.assert_close(denoise(compiled, case), eager, rtol=1e-5, atol=1e-5)
    assert_decisions(compiled, ALL_STEPS, [])


def test_int8_weight_only_caches_the_hand_worked_steps_and_repeats_without_recompiling(int8_case):
    """(b) and (c) on the quantized model."""
    case, _ = int8_case
    exact = denoise(compile_cachec(case.model, EXACT), case)
    compiled = compile_cachec(case.model, CACHED)
    assert_cached_and_repeatable(lambda: denoise(compiled, case), compiled, exact)
