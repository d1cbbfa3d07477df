"""A small class-conditional FLUX transformer on scikit-learn's 8x8 digits, upsampled to 16x16.

Shared by ``bench/train_digits.py`` (which trains it) and the benchmarks (which cache it):
data loading, the model config, FLUX-style packing, the rectified-flow sampler and a
scikit-learn classifier that scores generated digits.

The checkpoint in ``bench/digits_dit/`` is a plain diffusers directory plus
``conditioner.safetensors``, the learned class embeddings that stand in for a text encoder::

    from bench.digits import load_model, sample, accuracy
    transformer, conditioner = load_model()            # FluxTransformer2DModel, Conditioner
    images = sample(transformer, conditioner, labels=range(10))   # [10, 1, 16, 16] in [0, 1]
    print(accuracy(images, range(10)))

``FluxTransformer2DModel.from_pretrained("bench/digits_dit")`` alone loads the transformer.
Requires scikit-learn (``pip install scikit-learn``) for the data and the classifier.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT = Path(__file__).resolve().parent / "digits_dit"
CONDITIONER_FILE = "conditioner.safetensors"

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES          # the label of the unconditional (classifier-free guidance) branch
IMAGE_SIZE = 16                   # sklearn's 8x8 digits, upsampled
GRID = IMAGE_SIZE // 2            # 2x2 pixel patches -> an 8x8 grid of 64 image tokens
TEXT_TOKENS = 4                   # learned "text" tokens per class

MODEL_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=6, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
)


# ---------------------------------------------------------------------------------------------- data

def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split as ``(images [N, 1, 16, 16] in [-1, 1], labels [N])``.

    ``split`` is ``"train"`` (80%, 1437 images) or ``"test"`` (20%, 360), a fixed
    stratified split of ``sklearn.datasets.load_digits``; 8x8 values 0..16 are upsampled
    bilinearly to 16x16.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    train, test = train_test_split(range(len(data.target)), test_size=0.2, stratify=data.target, random_state=0)
    index = {"train": train, "test": test}[split]
    small = torch.tensor(data.images[index], dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(data.target[index], dtype=torch.long)


def pack(images: torch.Tensor) -> torch.Tensor:
    """FLUX packing: ``[N, C, H, W]`` images -> ``[N, H/2 * W/2, 4C]`` tokens of 2x2 patches."""
    n, c, h, w = images.shape
    patches = images.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack` for square images of side ``size``."""
    n, _, d = tokens.shape
    c = d // 4
    patches = tokens.view(n, size // 2, size // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, c, size, size)


def position_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """``(img_ids [64, 3], txt_ids [4, 3])`` as FluxPipeline builds them: (0, row, col) and zeros."""
    img_ids = torch.zeros(GRID, GRID, 3)
    img_ids[..., 1] = torch.arange(GRID)[:, None]
    img_ids[..., 2] = torch.arange(GRID)[None, :]
    return img_ids.reshape(-1, 3), torch.zeros(TEXT_TOKENS, 3)


# --------------------------------------------------------------------------------------------- model

class Conditioner(nn.Module):
    """Class labels -> FLUX text conditioning, a learned stand-in for the text encoders.

    Each of the 10 classes and the null class (index 10) owns ``tokens`` embeddings of width
    ``dim`` (``encoder_hidden_states``) and one pooled vector of width ``pooled_dim``
    (``pooled_projections``).
    """

    def __init__(self, tokens: int = TEXT_TOKENS, dim: int = MODEL_CONFIG["joint_attention_dim"],
                 pooled_dim: int = MODEL_CONFIG["pooled_projection_dim"]):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(NUM_CLASSES + 1, tokens, dim))
        self.pooled = nn.Parameter(torch.randn(NUM_CLASSES + 1, pooled_dim))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states [N, tokens, dim], pooled_projections [N, pooled_dim])``."""
        return self.tokens[labels], self.pooled[labels]

    def save(self, directory: str | Path) -> None:
        """Write the embeddings to ``directory/conditioner.safetensors``."""
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(Path(directory) / CONDITIONER_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "Conditioner":
        """Read a conditioner written by :meth:`save`; its sizes come from the stored shapes."""
        from safetensors.torch import load_file
        state = load_file(str(Path(directory) / CONDITIONER_FILE))
        _, tokens, dim = state["tokens"].shape
        conditioner = cls(tokens, dim, state["pooled"].shape[1])
        conditioner.load_state_dict(state)
        return conditioner


def build_model() -> tuple[nn.Module, Conditioner]:
    """A freshly initialised ``(FluxTransformer2DModel, Conditioner)`` pair."""
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(**MODEL_CONFIG), Conditioner()


def load_model(path: str | Path = CHECKPOINT) -> tuple[nn.Module, Conditioner]:
    """The trained ``(transformer, conditioner)`` from a checkpoint directory, in eval mode."""
    from diffusers import FluxTransformer2DModel
    transformer = FluxTransformer2DModel.from_pretrained(str(path), low_cpu_mem_usage=False)  # no accelerate needed
    return transformer.eval(), Conditioner.load(path).eval()


def velocity(transformer, hidden_states: torch.Tensor, t: torch.Tensor,
             condition: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One transformer call, keyword arguments as a diffusers pipeline passes them.

    ``t`` is the flow time in [0, 1] per sample (shape ``[N]``; the transformer scales it by
    1000 itself) and ``condition`` the conditioner's output. Returns the predicted velocity
    ``noise - x0``, shaped like ``hidden_states``.
    """
    img_ids, txt_ids = position_ids()
    encoder_hidden_states, pooled_projections = condition
    return transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                       pooled_projections=pooled_projections, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                       guidance=None, return_dict=False)[0]


@torch.no_grad()
def sample(transformer, conditioner: Conditioner, labels, steps: int = 28, guidance: float = 3.0,
           seed: int = 0, transformer_call=None) -> torch.Tensor:
    """Generate one digit per label: images ``[N, 1, 16, 16]`` in [0, 1].

    Euler steps of the rectified flow from t = 1 (noise) to t = 0 on a uniform grid, with
    classifier-free guidance as two separate transformer calls per step, conditional first,
    then unconditional (both with the same timestep), as diffusers pipelines with separate
    CFG do. ``transformer_call`` is what gets called (e.g. a ``torch.compile``'d transformer);
    by default ``transformer`` itself.
    """
    call = transformer if transformer_call is None else transformer_call
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    n = len(labels)
    cond, uncond = conditioner(labels), conditioner(torch.full_like(labels, NULL_CLASS))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, GRID * GRID, MODEL_CONFIG["in_channels"], generator=generator)
    times = torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        timestep = torch.full((n,), t)
        v_cond = velocity(call, x, timestep, cond)
        v_uncond = velocity(call, x, timestep, uncond)
        x = x + (t_next - t) * (v_uncond + guidance * (v_cond - v_uncond))
    return ((unpack(x) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------- classifier

def _features(images: torch.Tensor):
    """``[N, 1, 16, 16]`` images in [0, 1] -> ``[N, 256]`` numpy features."""
    return images.reshape(len(images), -1).double().numpy()


@functools.lru_cache(maxsize=1)
def classifier():
    """``(classifier, held_out_accuracy)``: an RBF SVC on the 16x16 training digits in [0, 1].

    Fitted once per process on the train split of :func:`load_digits`; the accuracy is
    measured on the test split.
    """
    from sklearn.svm import SVC
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    clf = SVC(C=10.0).fit(_features((train_x + 1) / 2), train_y.numpy())
    return clf, float(clf.score(_features((test_x + 1) / 2), test_y.numpy()))


def accuracy(images: torch.Tensor, labels) -> float:
    """Fraction of ``images`` (``[N, 1, 16, 16]`` in [0, 1]) that :func:`classifier` reads as ``labels``."""
    clf, _ = classifier()
    predicted = clf.predict(_features(images))
    return float((torch.as_tensor(predicted) == torch.as_tensor(list(labels))).double().mean())
