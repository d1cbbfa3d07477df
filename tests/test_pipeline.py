"""A real diffusers FluxPipeline, text encoders and VAE included, with the pipeline call unchanged."""
import torch

import cachec
from tiny_models import build_tiny_flux_pipeline

STEPS = 8


def generate(pipe, seed=0):
    return pipe("a cat", num_inference_steps=STEPS, height=32, width=32, guidance_scale=3.5,
                output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def test_flux_pipeline_end_to_end():
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    eager = generate(pipe)
    original = pipe.transformer

    pipe.transformer = torch.compile(original, backend="cachec",
                                     options={"inner_backend": "eager", "residual_diff_threshold": 0.0})
    torch.testing.assert_close(generate(pipe), eager, rtol=1e-5, atol=1e-5)
    assert cachec.summary(pipe.transformer).computed_steps == list(range(STEPS))

    torch._dynamo.reset()
    pipe.transformer = torch.compile(original, backend="cachec", options={
        "inner_backend": "eager", "residual_diff_threshold": 0.999, "max_warmup_steps": 2,
        "max_continuous_cached_steps": 2})
    first = generate(pipe)
    s = cachec.summary(pipe.transformer)
    assert s.steps == STEPS and s.computed_steps == [0, 1, 4, 7] and s.timestep_input == "timestep"
    with torch.compiler.set_stance("fail_on_recompile"):
        second = generate(pipe)
    assert cachec.summary(original).computed_steps == [0, 1, 4, 7]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert not torch.allclose(first, eager, atol=1e-3), "cached steps should change the image a little"
