"""Tiny random-weight diffusers transformers and their per-step inputs.

Every model is built offline from a config (no hub access) with weights seeded
deterministically, in float32 and eval mode, and small enough that one forward
call takes a few milliseconds on CPU.  Tests use them to run short denoising
loops through a compiled model::

    case = build("flux")
    compiled = torch.compile(case.model, backend="eager")
    latent = case.inputs(1.0)[case.latent_key]
    for t, t_next in [(1.0, 0.75), (0.75, 0.5)]:
        kwargs = case.with_latent(case.inputs(t), latent)
        latent = latent + (t_next - t) * case.latent_of(compiled(**kwargs))

(The update is a stand-in: models differ in what they predict and in its sign.)
Timesteps are given in ``[0, 1]``, 1 meaning pure noise, and converted to each
model's own convention as its pipeline does.  Image and text tokens have
different sequence lengths on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import diffusers
import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed, get_3d_rotary_pos_embed_allegro
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

TEXT_LEN = 8  # sequence length of every text embedding
COND_SEED, UNCOND_SEED = 1234, 4321  # seeds of the text embeddings of the two guidance branches
MODEL_SEED = 0  # seed of every model's weights


def _no_extras(batch: int) -> dict:
    return {}


@dataclass
class TinyCase:
    """A tiny model with a recipe for the keyword arguments of one forward call.

    ``conditioning(batch, generator)`` draws the branch-dependent tensors (text
    embeddings, pooled embeddings); ``extras(batch)`` gives the inputs that are
    the same for every step and branch (masks, position ids, guidance, shapes).
    """

    name: str
    model: torch.nn.Module
    timestep_key: str
    latent_shape: tuple[int, ...]
    to_model_time: Callable[[float], float]
    conditioning: Callable[[int, torch.Generator], dict]
    extras: Callable[[int], dict] = _no_extras
    latent_key: str = "hidden_states"
    learned_sigma: bool = False

    def inputs(self, t: float, *, batch: int = 1, seed: int = 0, branch: str = "cond") -> dict:
        """Keyword arguments for one forward call at timestep ``t`` (1 = pure noise)."""
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
        latent = torch.randn((batch, *self.latent_shape), generator=torch.Generator().manual_seed(seed))
        text_seed = COND_SEED if branch == "cond" else UNCOND_SEED
        return {
            self.latent_key: latent,
            self.timestep_key: torch.full((batch,), float(self.to_model_time(t))),
            **self.conditioning(batch, torch.Generator().manual_seed(text_seed)),
            **self.extras(batch),
            "return_dict": False,
        }

    def latent_of(self, out) -> torch.Tensor:
        """The predicted latent (velocity or noise) from the model's return value."""
        sample = out[0]
        if self.learned_sigma:
            sample = sample.chunk(2, dim=1)[0]
        return sample

    def with_latent(self, kwargs: dict, latent: torch.Tensor) -> dict:
        """A copy of ``kwargs`` with the latent input replaced."""
        return {**kwargs, self.latent_key: latent}


def _seeded(model_cls, **config) -> torch.nn.Module:
    """``model_cls(**config)`` with weights drawn after seeding ``MODEL_SEED``, in eval mode."""
    torch.manual_seed(MODEL_SEED)
    return model_cls(**config).eval()


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _text_states(batch: int, gen: torch.Generator) -> dict:
    """The conditioning of models that take a single ``(batch, TEXT_LEN, 32)`` text embedding."""
    return {"encoder_hidden_states": _randn(gen, batch, TEXT_LEN, 32)}


def _flow_time(t: float) -> float:
    """Flow-matching time as is (FLUX, Chroma, Qwen and AuraFlow scale it by 1000 themselves)."""
    return t


def _train_time(t: float) -> float:
    """Time on the 0..1000 training scale (SD3, Wan, PixArt, CogVideoX, ...)."""
    return t * 1000.0


def _image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX-style ``(height * width, 3)`` position ids of packed latent tokens."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _tiny_flux_transformer(double: int = 2, single: int = 3) -> torch.nn.Module:
    """FLUX.1-dev transformer (guidance-distilled) shared by ``build("flux")``, the tiny pipeline
    and the benches (which ask for FLUX's depth, 19 + 38, at these widths)."""
    return _seeded(
        diffusers.FluxTransformer2DModel,
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def build_flux() -> TinyCase:
    """FLUX.1-dev: 2 double + 3 single blocks, 8x8 packed latent tokens (64) of 16 channels."""
    return TinyCase(
        name="flux",
        model=_tiny_flux_transformer(),
        timestep_key="timestep",
        latent_shape=(64, 16),
        to_model_time=_flow_time,
        conditioning=lambda b, g: {
            "encoder_hidden_states": _randn(g, b, TEXT_LEN, 32),
            "pooled_projections": _randn(g, b, 32),
        },
        extras=lambda b: {
            "img_ids": _image_ids(8, 8),
            "txt_ids": torch.zeros(TEXT_LEN, 3),
            "guidance": torch.full((b,), 3.5),
        },
    )


def build_sd3() -> TinyCase:
    """SD3: 2 joint blocks (the last one context-pre-only), 16x16x4 latent, patch 2 (64 tokens)."""
    model = _seeded(
        diffusers.SD3Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    return TinyCase(
        name="sd3",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 16, 16),
        to_model_time=_train_time,
        conditioning=lambda b, g: {
            "encoder_hidden_states": _randn(g, b, TEXT_LEN, 32),
            "pooled_projections": _randn(g, b, 32),
        },
    )


def build_wan() -> TinyCase:
    """Wan 2.1 text-to-video: 2 blocks, 2x8x8x4 latent, patch (1, 2, 2) (32 tokens)."""
    model = _seeded(
        diffusers.WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )
    return TinyCase(
        name="wan",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 2, 8, 8),
        to_model_time=_train_time,
        conditioning=_text_states,
    )


def build_pixart() -> TinyCase:
    """PixArt-Sigma: 2 blocks, 16x16x4 latent, patch 2 (64 tokens), learned sigma (8 output channels)."""
    model = _seeded(
        diffusers.PixArtTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=16,
        patch_size=2,
        caption_channels=32,
        use_additional_conditions=False,
    )
    return TinyCase(
        name="pixart",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 16, 16),
        to_model_time=_train_time,
        conditioning=_text_states,
        extras=lambda b: {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
        learned_sigma=True,
    )


def build_cogvideox() -> TinyCase:
    """CogVideoX-2b style (sincos positions): 2 blocks, 2 latent frames of 8x8x4, frames-first layout."""
    model = _seeded(
        diffusers.CogVideoXTransformer3DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
    )
    return TinyCase(
        name="cogvideox",
        model=model,
        timestep_key="timestep",
        latent_shape=(2, 4, 8, 8),
        to_model_time=_train_time,
        conditioning=_text_states,
    )


def build_qwenimage() -> TinyCase:
    """Qwen-Image: 2 blocks, 8x8 packed latent tokens (64) of 16 channels, with a text mask."""
    model = _seeded(
        diffusers.QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return TinyCase(
        name="qwenimage",
        model=model,
        timestep_key="timestep",
        latent_shape=(64, 16),
        to_model_time=_flow_time,
        conditioning=_text_states,
        extras=lambda b: {
            "encoder_hidden_states_mask": torch.ones(b, TEXT_LEN, dtype=torch.long),
            "img_shapes": [[(1, 8, 8)]] * b,
        },
    )


def build_hunyuanvideo() -> TinyCase:
    """HunyuanVideo: 2 token-refiner, 2 double and 2 single blocks, 2x8x8x4 latent (32 tokens)."""
    model = _seeded(
        diffusers.HunyuanVideoTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    return TinyCase(
        name="hunyuanvideo",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 2, 8, 8),
        to_model_time=_train_time,
        conditioning=lambda b, g: {
            "encoder_hidden_states": _randn(g, b, TEXT_LEN, 32),
            "pooled_projections": _randn(g, b, 32),
        },
        extras=lambda b: {
            "encoder_attention_mask": torch.ones(b, TEXT_LEN),
            "guidance": torch.full((b,), 6.0 * 1000.0),
        },
    )


def build_ltx() -> TinyCase:
    """LTX-Video: 2 blocks, 2x4x4 latent packed into 32 tokens of 8 channels."""
    model = _seeded(
        diffusers.LTXVideoTransformer3DModel,
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    return TinyCase(
        name="ltx",
        model=model,
        timestep_key="timestep",
        latent_shape=(32, 8),
        to_model_time=_train_time,
        conditioning=_text_states,
        extras=lambda b: {
            "encoder_attention_mask": torch.ones(b, TEXT_LEN),
            "num_frames": 2,
            "height": 4,
            "width": 4,
            "rope_interpolation_scale": (8 / 25, 32, 32),
        },
    )


def build_cosmos() -> TinyCase:
    """Cosmos-Predict2 text-to-image style: 2 blocks, 1x8x8x4 latent (16 tokens).

    ``concat_padding_mask`` is off because it needs torchvision.
    """
    model = _seeded(
        diffusers.CosmosTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=32,
        adaln_lora_dim=8,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False,
        extra_pos_embed_type=None,
    )
    return TinyCase(
        name="cosmos",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 1, 8, 8),
        to_model_time=_flow_time,
        conditioning=_text_states,
    )


def build_chroma() -> TinyCase:
    """Chroma: FLUX without pooled text and guidance, 2 double + 2 single blocks, 64 packed tokens."""
    model = _seeded(
        diffusers.ChromaTransformer2DModel,
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    )
    return TinyCase(
        name="chroma",
        model=model,
        timestep_key="timestep",
        latent_shape=(64, 16),
        to_model_time=_flow_time,
        conditioning=_text_states,
        extras=lambda b: {"img_ids": _image_ids(8, 8), "txt_ids": torch.zeros(TEXT_LEN, 3)},
    )


def build_lumina2() -> TinyCase:
    """Lumina-Image 2.0: 2 noise-refiner, 2 context-refiner and 2 main blocks, 16x16x4 latent.

    Lumina counts time the other way round (0 = pure noise).
    """
    model = _seeded(
        diffusers.Lumina2Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=2,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32),
        cap_feat_dim=32,
    )
    return TinyCase(
        name="lumina2",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 16, 16),
        to_model_time=lambda t: 1.0 - t,
        conditioning=_text_states,
        extras=lambda b: {"encoder_attention_mask": torch.ones(b, TEXT_LEN, dtype=torch.bool)},
    )


def build_sana() -> TinyCase:
    """Sana: 2 linear-attention blocks, 8x8x4 latent, patch 1 (64 tokens)."""
    model = _seeded(
        diffusers.SanaTransformer2DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=8,
        patch_size=1,
    )
    return TinyCase(
        name="sana",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 8, 8),
        to_model_time=_train_time,
        conditioning=_text_states,
        extras=lambda b: {"encoder_attention_mask": torch.ones(b, TEXT_LEN)},
    )


def _allegro_rotary_emb(head_dim: int, frames: int, grid: int) -> tuple[tuple, tuple]:
    """Allegro's rotary embedding, computed outside the model as its pipeline does."""
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=head_dim,
        crops_coords=((0, 0), (grid, grid)),
        grid_size=(grid, grid),
        temporal_size=frames,
        interpolation_scale=(2.2, 2.0, 2.0),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    grid_t, grid_h, grid_w = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)


def build_allegro() -> TinyCase:
    """Allegro: 2 blocks, 2x8x8x4 latent, patch 2 (32 tokens), rotary embedding passed in."""
    model = _seeded(
        diffusers.AllegroTransformer3DModel,
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=48,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=32,
    )
    rotary_emb = _allegro_rotary_emb(24, frames=2, grid=4)
    return TinyCase(
        name="allegro",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 2, 8, 8),
        to_model_time=_train_time,
        conditioning=_text_states,
        extras=lambda b: {"encoder_attention_mask": torch.ones(b, TEXT_LEN), "image_rotary_emb": rotary_emb},
    )


def build_mochi() -> TinyCase:
    """Mochi 1: 2 blocks (the last one context-pre-only), 2x8x8x4 latent (32 tokens).

    Mochi counts time the other way round (0 = pure noise).
    """
    model = _seeded(
        diffusers.MochiTransformer3DModel,
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=32,
        time_embed_dim=16,
        max_sequence_length=TEXT_LEN,
    )
    return TinyCase(
        name="mochi",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 2, 8, 8),
        to_model_time=lambda t: (1.0 - t) * 1000.0,
        conditioning=_text_states,
        extras=lambda b: {"encoder_attention_mask": torch.ones(b, TEXT_LEN)},
    )


def build_hidream() -> TinyCase:
    """HiDream-I1: 2 double + 2 single mixture-of-experts blocks, 16x16x4 latent, patch 2 (64 tokens).

    The Llama states are one ``(batch, seq, dim)`` tensor per block, stacked in front.
    """
    num_blocks = 4
    model = _seeded(
        diffusers.HiDreamImageTransformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[32, 16],
        text_emb_dim=32,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        max_resolution=(32, 32),
        llama_layers=list(range(num_blocks)),
    )
    return TinyCase(
        name="hidream",
        model=model,
        timestep_key="timesteps",
        latent_shape=(4, 16, 16),
        to_model_time=_train_time,
        conditioning=lambda b, g: {
            "encoder_hidden_states_t5": _randn(g, b, TEXT_LEN, 32),
            "encoder_hidden_states_llama3": _randn(g, num_blocks, b, TEXT_LEN, 16),
            "pooled_embeds": _randn(g, b, 32),
        },
    )


def build_auraflow() -> TinyCase:
    """AuraFlow: 2 MMDiT + 2 single DiT blocks, 16x16x4 latent, patch 2 (64 tokens)."""
    model = _seeded(
        diffusers.AuraFlowTransformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=256,
    )
    return TinyCase(
        name="auraflow",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 16, 16),
        to_model_time=_flow_time,
        conditioning=_text_states,
    )


def build_hunyuandit() -> TinyCase:
    """HunyuanDiT v1.2: 4 blocks with long skips, 16x16x4 latent, patch 2 (64 tokens), learned sigma."""
    model = _seeded(
        diffusers.HunyuanDiT2DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        patch_size=2,
        sample_size=16,
        hidden_size=32,
        num_layers=4,
        mlp_ratio=2.0,
        cross_attention_dim=32,
        cross_attention_dim_t5=32,
        pooled_projection_dim=16,
        text_len=TEXT_LEN,
        text_len_t5=TEXT_LEN,
        use_style_cond_and_image_meta_size=False,
    )
    rotary_emb = get_2d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), output_type="pt")
    return TinyCase(
        name="hunyuandit",
        model=model,
        timestep_key="timestep",
        latent_shape=(4, 16, 16),
        to_model_time=_train_time,
        conditioning=lambda b, g: {
            "encoder_hidden_states": _randn(g, b, TEXT_LEN, 32),
            "encoder_hidden_states_t5": _randn(g, b, TEXT_LEN, 32),
        },
        extras=lambda b: {
            "text_embedding_mask": torch.ones(b, TEXT_LEN, dtype=torch.long),
            "text_embedding_mask_t5": torch.ones(b, TEXT_LEN, dtype=torch.long),
            "image_rotary_emb": rotary_emb,
        },
        learned_sigma=True,
    )


_BUILDERS: dict[str, Callable[[], TinyCase]] = {
    "flux": build_flux,
    "sd3": build_sd3,
    "wan": build_wan,
    "pixart": build_pixart,
    "cogvideox": build_cogvideox,
    "qwenimage": build_qwenimage,
    "hunyuanvideo": build_hunyuanvideo,
    "ltx": build_ltx,
    "cosmos": build_cosmos,
    "chroma": build_chroma,
    "lumina2": build_lumina2,
    "sana": build_sana,
    "allegro": build_allegro,
    "mochi": build_mochi,
    "hidream": build_hidream,
    "auraflow": build_auraflow,
    "hunyuandit": build_hunyuandit,
}

MODEL_NAMES = list(_BUILDERS)


def build(name: str) -> TinyCase:
    """Builds the tiny model called ``name`` (one of ``MODEL_NAMES``)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {MODEL_NAMES}") from None
    return builder()


def _tiny_clip() -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A character-level CLIP tokenizer (no merges) and a 2-layer CLIP text encoder of width 32."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    torch.manual_seed(MODEL_SEED)
    return CLIPTextModel(config).eval(), tokenizer


def _tiny_t5() -> tuple[T5EncoderModel, T5Tokenizer]:
    """A character-level unigram T5 tokenizer and a 2-layer T5 encoder of width 32."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + char, -1.0) for char in letters] + [(char, -2.0) for char in letters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(MODEL_SEED)
    return T5EncoderModel(config).eval(), tokenizer


def _tiny_vae() -> diffusers.AutoencoderKL:
    """A 2-level AutoencoderKL (2x downscaling) with 4 latent channels."""
    return _seeded(
        diffusers.AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def build_tiny_flux_pipeline() -> diffusers.FluxPipeline:
    """A real ``FluxPipeline`` of tiny components, built offline.

    The VAE downscales 2x, so a 32x32 image is a 16x16x4 latent, i.e. the same
    64 packed tokens of 16 channels as ``build("flux")``.
    """
    text_encoder, tokenizer = _tiny_clip()
    text_encoder_2, tokenizer_2 = _tiny_t5()
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=_tiny_flux_transformer(),
    )
