"""Real diffusers pipelines of tiny components, built offline, and ``generate`` to run them.

Every pipeline is the unchanged diffusers class with its usual scheduler, text encoder(s) and
tokenizer(s), VAE and transformer, all random-weight (seeded with ``MODEL_SEED``), in eval mode and
float32 unless said otherwise; the transformers are ``tiny_models``' ones.  ``generate(pipe, steps)``
runs one with the prompts and sizes of ``CALL_KWARGS``; 8 steps take 0.05-0.2 s on one CPU thread.
The Wan 2.1 (UniPC), Qwen-Image (flow-match Euler) and CogVideoX-2b (DDIM) scheduler configs are written
from the published ``scheduler_config.json`` files as remembered, not read from the hub (no access).

What the transformer receives, per pipeline, in diffusers 0.42.1 (B = batch of prompts, 1 here):

* ``build_wan_pipeline()`` (``WanPipeline``, UniPC flow scheduler): ``timestep`` is the scheduler's
  int64 timestep (999, 954, 900, ... at 8 steps) expanded to shape ``(B,)``.  With
  ``expand_timesteps=True`` it is float32 of shape ``(B, seq_len)`` (here ``(1, 32)``: the latent
  mask, float32, times ``t``).  Two
  calls per step (guidance_scale > 1): cond then uncond, each wrapped in
  ``transformer.cache_context("cond"|"uncond", step_index=i, sigma=float(scheduler.sigmas[i]),
  num_inference_steps=len(timesteps))``.  Text: ``(B, 512, 32)`` for both (zero-padded to max length).
* ``build_pixart_sigma_pipeline()`` (``PixArtSigmaPipeline``, DPM-Solver++): ``timestep`` int64 of
  shape ``(2B,)``: ONE call per step with uncond and cond batched together (text ``(2B, 300, 32)`` with
  an ``encoder_attention_mask``).  No ``cache_context`` (PixArtTransformer2DModel has none).
* ``build_flux_pipeline()`` (``FluxPipeline``, FLUX.1-dev guidance-distilled): ``timestep`` is
  ``t.to(latents.dtype) / 1000`` in the pipeline's dtype (bfloat16 by default), shape ``(B,)``, plus
  ``guidance`` ``(B,)``.  One call per step (true CFG off), in ``cache_context("cond")`` with no fields.
  With ``large_image_shift`` the tiny 64-token image gets mu = 2.0167, FLUX.1's at 1536x1536.  At 50
  steps two pairs of consecutive steps then receive the same bfloat16 timestep: steps 1 and 2
  (both 0.99609375; scheduler 997.29 and 994.48) and steps 5 and 6 (both 0.984375; 985.43 and 982.17):
  48 distinct values for 50 steps.  With the shipped shift (mu = 0.4675) there is no collision.
* ``build_qwenimage_pipeline()`` (``QwenImagePipeline``, true CFG): ``timestep`` float32 ``t / 1000``,
  shape ``(B,)``.  Two calls per step, in ``cache_context("cond")`` and ``cache_context("uncond")``
  with no fields.  The prompt and negative prompt encode to 133 and 151 text tokens (prompt template
  included, after the 34 dropped), so the two calls have different text sequence lengths; the text
  mask is ``None`` (all ones, one prompt).
* ``build_flux_controlnet_pipeline()`` (``FluxControlNetPipeline``): the ControlNet, then the
  transformer, once per step each, both with float32 ``timestep`` ``t / 1000`` of shape ``(B,)``; the
  transformer gets ``controlnet_block_samples`` (2 tensors) and ``controlnet_single_block_samples``
  (1 tensor) of shape ``(B, 64, 32)``.  No ``cache_context``.
* ``build_sd3_pipeline()`` (``StableDiffusion3Pipeline``, flow-match Euler, shift 3.0): ``timestep`` is the
  scheduler's float32 timestep on the 0..1000 scale (1000.0, 947.54, ..., 8.93 at 8 steps), shape ``(2B,)``:
  ONE call per step with uncond and cond batched together (latent ``(2B, 4, 16, 16)``, text
  ``(2B, 333, 32)``: 77 CLIP then 256 T5 tokens, pooled ``(2B, 32)``).  No ``cache_context``.
* ``build_cogvideox_pipeline()`` (``CogVideoXPipeline``, CogVideoX DDIM): ``timestep`` int64 (999, 874,
  ..., 124 at 8 steps), shape ``(2B,)``: ONE call per step, uncond and cond batched (latent
  ``(2B, 2, 4, 8, 8)``, frames first; text ``(2B, 8, 32)``), in ``cache_context("cond_uncond")`` with no fields.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, T5Tokenizer, UMT5Config,
                          UMT5EncoderModel)

from tiny_models import (MODEL_SEED, TEXT_LEN, _seeded, _tiny_clip, _tiny_t5, _tiny_vae, build,
                         build_tiny_flux_pipeline)

FLUX_1536_MU = calculate_shift(9216, 256, 4096, 0.5, 1.15)  # FLUX.1's shift at 1536x1536 (9216 tokens): ~2.017
FLUX_TINY_TOKENS = 64  # packed latent tokens of the tiny FLUX pipelines' 32x32 image

_CONTROL_IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))

# What ``generate`` passes to each pipeline besides the step count, the generator and the output type.
CALL_KWARGS: dict[type, dict] = {
    diffusers.WanPipeline: dict(prompt="a cat", negative_prompt="blurry", height=16, width=16, num_frames=3,
                                guidance_scale=5.0),
    diffusers.PixArtSigmaPipeline: dict(prompt="a cat", negative_prompt="blurry", height=32, width=32,
                                        guidance_scale=4.5, use_resolution_binning=False, clean_caption=False),
    diffusers.FluxPipeline: dict(prompt="a cat", height=32, width=32, guidance_scale=3.5),
    diffusers.QwenImagePipeline: dict(prompt="a cat", negative_prompt="a blurry photo of a dog", height=32,
                                      width=32, true_cfg_scale=4.0),
    diffusers.FluxControlNetPipeline: dict(prompt="a cat", height=32, width=32, guidance_scale=3.5,
                                           control_image=_CONTROL_IMAGE, controlnet_conditioning_scale=0.7),
    diffusers.StableDiffusion3Pipeline: dict(prompt="a cat", negative_prompt="blurry", height=32, width=32,
                                             guidance_scale=7.0),
    diffusers.CogVideoXPipeline: dict(prompt="a cat", negative_prompt="blurry", height=32, width=32, num_frames=5,
                                      guidance_scale=6.0, max_sequence_length=TEXT_LEN),
}


def generate(pipe: diffusers.DiffusionPipeline, steps: int, seed: int = 0, **kw) -> torch.Tensor:
    """Runs ``pipe`` unchanged for ``steps`` steps and returns its output as a float32 tensor.

    The call uses ``CALL_KWARGS[type(pipe)]``, overridden by ``kw``; ``output_type="pt"`` gives the
    image(s) or video, ``output_type="latent"`` the final latents.
    """
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**CALL_KWARGS[type(pipe)], "output_type": "pt", **kw}
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), return_dict=False,
               **kwargs)[0]
    return torch.as_tensor(out).float()


def _tiny_umt5() -> tuple[UMT5EncoderModel, T5Tokenizer]:
    """The tiny T5 tokenizer and a UMT5 encoder with the tiny T5's config (2 layers, width 32)."""
    t5, tokenizer = _tiny_t5()
    config = {k: v for k, v in t5.config.to_dict().items() if k not in ("model_type", "architectures")}
    torch.manual_seed(MODEL_SEED)
    return UMT5EncoderModel(UMT5Config(**config)).eval(), tokenizer


def _tiny_qwen_vl() -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer]:
    """A byte-level Qwen2 tokenizer (256 bytes, no merges, chat tokens) and a 2-layer Qwen2.5-VL of width 32."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=specials[1:])
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
    )
    torch.manual_seed(MODEL_SEED)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def _tiny_causal_vae(cls, temporal_downsample: bool, **config):
    """A causal 3D VAE of Wan's design (``cls`` is ``AutoencoderKLWan`` or ``AutoencoderKLQwenImage``).

    One 2x spatial downscaling (also temporal if ``temporal_downsample``), 4 latent channels of mean 0, std 1.
    """
    return _seeded(cls, base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                   temperal_downsample=[temporal_downsample], latents_mean=[0.0] * 4, latents_std=[1.0] * 4, **config)


def build_wan_pipeline(expand_timesteps: bool = False) -> diffusers.WanPipeline:
    """Wan 2.1 text-to-video (or, with ``expand_timesteps``, Wan 2.2 TI2V-style per-token timesteps).

    UniPC flow scheduler as Wan 2.1 ships it, tiny UMT5, a VAE that downscales 2x in space and time,
    and ``build("wan")``'s transformer: a 16x16, 3-frame video is 2 latent frames of 8x8x4 (32 tokens).
    """
    text_encoder, tokenizer = _tiny_umt5()
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    vae = _tiny_causal_vae(diffusers.AutoencoderKLWan, True, scale_factor_temporal=2, scale_factor_spatial=2)
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                 transformer=build("wan").model, expand_timesteps=expand_timesteps)


def build_pixart_sigma_pipeline() -> diffusers.PixArtSigmaPipeline:
    """PixArt-Sigma with DPM-Solver++, tiny T5 and VAE, ``build("pixart")``'s transformer (32x32 image, 64 tokens)."""
    text_encoder, tokenizer = _tiny_t5()
    return diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(),
                                         transformer=build("pixart").model,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())


def _flux_scheduler(large_image_shift: bool) -> diffusers.FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler; ``large_image_shift`` scales its sequence lengths so the tiny image gets ``FLUX_1536_MU``."""
    scale = FLUX_TINY_TOKENS / 9216 if large_image_shift else 1.0
    return diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256 * scale, max_image_seq_len=4096 * scale, time_shift_type="exponential")


def build_flux_pipeline(dtype: torch.dtype = torch.bfloat16, large_image_shift: bool = True) -> diffusers.FluxPipeline:
    """``build_tiny_flux_pipeline()`` all in ``dtype``; with ``large_image_shift``, shifted as FLUX.1 at 1536x1536.

    Without it the scheduler is FLUX.1's as shipped, which gives the 64-token image mu = 0.4675.
    """
    pipe = build_tiny_flux_pipeline()
    pipe.scheduler = _flux_scheduler(large_image_shift)
    return pipe.to(dtype)


def build_qwenimage_pipeline() -> diffusers.QwenImagePipeline:
    """Qwen-Image: tiny Qwen2.5-VL and byte-level tokenizer, a 2x causal VAE, ``build("qwenimage")``'s transformer.

    A 32x32 image is 64 packed tokens of 16 channels.  The scheduler is the one Qwen-Image ships.
    """
    text_encoder, tokenizer = _tiny_qwen_vl()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    vae = _tiny_causal_vae(diffusers.AutoencoderKLQwenImage, False)
    return diffusers.QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       transformer=build("qwenimage").model)


def build_flux_controlnet_pipeline() -> diffusers.FluxControlNetPipeline:
    """FLUX.1 ControlNet: the tiny FLUX pipeline and a 2 double + 1 single block ControlNet made from its transformer.

    The ControlNet's zero-initialised projections are redrawn at random so that its residuals are not zero.
    """
    flux = build_tiny_flux_pipeline()
    torch.manual_seed(MODEL_SEED)
    controlnet = diffusers.FluxControlNetModel.from_transformer(
        flux.transformer, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
    zero_initialised = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks,
                        controlnet.controlnet_x_embedder]
    for layer in zero_initialised:
        layer.reset_parameters()
    return diffusers.FluxControlNetPipeline(controlnet=controlnet.eval(), **flux.components)


def _tiny_clip_with_projection(width: int) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    """The tiny CLIP tokenizer and a 2-layer CLIP text encoder of ``width``, projected to ``width`` as SD3's are."""
    clip, tokenizer = _tiny_clip()
    config = {k: v for k, v in clip.config.to_dict().items() if k not in ("model_type", "architectures")}
    config.update(hidden_size=width, intermediate_size=2 * width, projection_dim=width)
    torch.manual_seed(MODEL_SEED)
    return CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval(), tokenizer


def build_sd3_pipeline() -> diffusers.StableDiffusion3Pipeline:
    """SD3: two CLIPs with projection (widths 12 and 20, as 768 and 1280), tiny T5, ``build("sd3")``'s transformer.

    The CLIP states (12 + 20 = 32 wide) are padded to the T5 width (32) and put in front of the T5 ones; the
    pooled projections make the 32-wide pooled input.  A 4-channel VAE (SD3's has 16) that downscales 2x: a
    32x32 image is a 16x16x4 latent (64 tokens).  Flow-match Euler with SD3's static shift 3.0.
    """
    text_encoder, tokenizer = _tiny_clip_with_projection(12)
    text_encoder_2, tokenizer_2 = _tiny_clip_with_projection(20)
    text_encoder_3, tokenizer_3 = _tiny_t5()
    return diffusers.StableDiffusion3Pipeline(
        transformer=build("sd3").model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_cogvideox_pipeline() -> diffusers.CogVideoXPipeline:
    """CogVideoX-2b: tiny T5, a CogVideoX VAE (4x in space and time), ``build("cogvideox")``'s transformer.

    A 32x32, 5-frame video is 2 latent frames of 8x8x4 (the transformer's sample size, so its stored
    sincos positions are used), decoded to 8 frames.  The prompt is padded to ``TEXT_LEN`` tokens, the
    tiny transformer's ``max_text_seq_length`` (226 in CogVideoX-2b).  The scheduler is 2b's DDIM config.
    """
    text_encoder, tokenizer = _tiny_t5()
    vae = _seeded(diffusers.AutoencoderKLCogVideoX, down_block_types=("CogVideoXDownBlock3D",) * 3,
                  up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=32,
                  sample_width=32)
    scheduler = diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
        steps_offset=0, timestep_spacing="trailing")
    return diffusers.CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=build("cogvideox").model, scheduler=scheduler)
