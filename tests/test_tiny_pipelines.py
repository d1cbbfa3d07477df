"""The tiny real pipelines run uncompiled, deterministically, and call their transformer as documented."""
import contextlib

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import tiny_pipelines as tp

STEPS = 2


def record_calls(pipe) -> list[dict]:
    """Records the timestep, text states and cache context of every transformer call of ``pipe``."""
    calls, context = [], [None]

    @contextlib.contextmanager
    def cache_context(name, **fields):
        context[0] = (name, sorted(fields))
        try:
            yield
        finally:
            context[0] = None

    def hook(module, args, kwargs):
        calls.append({"timestep": kwargs["timestep"], "text": kwargs["encoder_hidden_states"],
                      "context": context[0], **{k: v for k, v in kwargs.items() if k.startswith("controlnet_")}})

    pipe.transformer.cache_context = cache_context  # shadows the method on this instance only
    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


WAN_FIELDS = ["num_inference_steps", "sigma", "step_index"]
# builder, output shape, timestep dtype and shape, cache contexts of the calls of one step
CASES = {
    "wan": (tp.build_wan_pipeline, (1, 3, 3, 16, 16), torch.int64, (1,),
            [("cond", WAN_FIELDS), ("uncond", WAN_FIELDS)]),
    "wan_expand": (lambda: tp.build_wan_pipeline(expand_timesteps=True), (1, 3, 3, 16, 16), torch.float32, (1, 32),
                   [("cond", WAN_FIELDS), ("uncond", WAN_FIELDS)]),
    "pixart_sigma": (tp.build_pixart_sigma_pipeline, (1, 3, 32, 32), torch.int64, (2,), [None]),
    "flux": (tp.build_flux_pipeline, (1, 3, 32, 32), torch.bfloat16, (1,), [("cond", [])]),
    "qwenimage": (tp.build_qwenimage_pipeline, (1, 3, 32, 32), torch.float32, (1,), [("cond", []), ("uncond", [])]),
    "flux_controlnet": (tp.build_flux_controlnet_pipeline, (1, 3, 32, 32), torch.float32, (1,), [None]),
    "sd3": (tp.build_sd3_pipeline, (1, 3, 32, 32), torch.float32, (2,), [None]),
    "cogvideox": (tp.build_cogvideox_pipeline, (1, 8, 3, 32, 32), torch.int64, (2,), [("cond_uncond", [])]),
}


@pytest.mark.parametrize("name", CASES)
def test_pipeline_runs_deterministically(name):
    builder, shape, dtype, timestep_shape, contexts = CASES[name]
    pipe = builder()
    calls = record_calls(pipe)
    first = tp.generate(pipe, STEPS)
    assert first.shape == shape and first.dtype == torch.float32 and first.isfinite().all()
    assert len(calls) == STEPS * len(contexts)
    assert [c["context"] for c in calls] == contexts * STEPS
    assert all(c["timestep"].dtype == dtype and c["timestep"].shape == timestep_shape for c in calls)
    torch.testing.assert_close(tp.generate(pipe, STEPS), first, rtol=0, atol=0)
    torch.testing.assert_close(tp.generate(builder(), STEPS), first, rtol=0, atol=0)  # a second build: same weights
    assert not torch.equal(tp.generate(pipe, STEPS, seed=1), first)


def test_qwenimage_cond_and_uncond_text_lengths_differ():
    pipe = tp.build_qwenimage_pipeline()
    calls = record_calls(pipe)
    tp.generate(pipe, STEPS)
    assert [c["text"].shape[1] for c in calls] == [133, 151] * STEPS


@pytest.mark.parametrize("builder, text_shape", [(tp.build_sd3_pipeline, (2, 77 + 256, 32)),
                                                  (tp.build_cogvideox_pipeline, (2, 8, 32))])
def test_batched_cfg_passes_uncond_and_cond_text_together(builder, text_shape):
    pipe = builder()
    calls = record_calls(pipe)
    tp.generate(pipe, STEPS)
    assert all(c["text"].shape == text_shape for c in calls)
    uncond, cond = calls[0]["text"]
    assert not torch.equal(uncond, cond)


def test_flux_controlnet_passes_nonzero_residuals():
    pipe = tp.build_flux_controlnet_pipeline()
    calls = record_calls(pipe)
    with_control = tp.generate(pipe, STEPS)
    double, single = calls[0]["controlnet_block_samples"], calls[0]["controlnet_single_block_samples"]
    assert len(double) == 2 and len(single) == 1
    assert all(s.shape == (1, 64, 32) and s.abs().max() > 0 for s in (*double, *single))
    assert not torch.allclose(tp.generate(pipe, STEPS, controlnet_conditioning_scale=0.0), with_control)


@pytest.mark.parametrize("large_image_shift, mu", [(True, tp.FLUX_1536_MU), (False, 0.4675)])
def test_flux_shift(large_image_shift, mu):
    config = tp.build_flux_pipeline(large_image_shift=large_image_shift).scheduler.config
    got = calculate_shift(tp.FLUX_TINY_TOKENS, config.base_image_seq_len, config.max_image_seq_len,
                          config.base_shift, config.max_shift)
    assert got == pytest.approx(mu) and tp.FLUX_1536_MU == pytest.approx(2.0167, abs=1e-4)


def test_flux_bf16_timesteps_collide_at_50_steps():
    pipe = tp.build_flux_pipeline()
    calls = record_calls(pipe)
    tp.generate(pipe, 50, output_type="latent")
    t = torch.cat([c["timestep"] for c in calls])
    assert t.dtype == torch.bfloat16 and len(t) == 50
    collisions = [(i, i + 1) for i in range(49) if t[i] == t[i + 1]]
    assert collisions == [(1, 2), (5, 6)]
    assert t[1].item() == 0.99609375 and t[5].item() == 0.984375
