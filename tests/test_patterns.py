"""cache-dit's forward patterns 0-5 on toy blocks, through the same checks as the diffusers models.

    pattern  block takes          block returns
    0        hidden, encoder      (hidden, encoder)
    1        hidden, encoder      (encoder, hidden)
    2        hidden, encoder      hidden            (encoder is a side input, PixArt-like)
    3        hidden               hidden
    4        hidden               (hidden, encoder) (encoder made from hidden; the epilogue reads it)
    5        hidden               (encoder, hidden)
"""
import pytest
import torch

import cachec
from test_models import check_cached_generations, compile_case, denoise, assert_outputs_close
from tiny_models import TinyCase

D, S, T = 16, 12, 5


class Block(torch.nn.Module):
    def __init__(self, pattern: int):
        super().__init__()
        self.pattern = pattern
        self.h = torch.nn.Linear(D, D)
        self.e = torch.nn.Linear(D, D)
        self.mod = torch.nn.Linear(D, D)

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None):
        shift = self.mod(temb)[:, None]
        h = hidden_states + torch.tanh(self.h(hidden_states) + shift)
        if self.pattern in (0, 1):
            ctx = encoder_hidden_states.mean(1, keepdim=True)
            h = h + 0.1 * ctx
            e = encoder_hidden_states + torch.tanh(self.e(encoder_hidden_states) + shift + h.mean(1, keepdim=True))
            return (h, e) if self.pattern == 0 else (e, h)
        if self.pattern == 2:
            return h + 0.1 * encoder_hidden_states.mean(1, keepdim=True)
        if self.pattern == 3:
            return h
        e = torch.tanh(self.e(h[:, :T]))
        return (h, e) if self.pattern == 4 else (e, h)


class PatternDiT(torch.nn.Module):
    def __init__(self, pattern: int, n: int = 4):
        super().__init__()
        self.pattern = pattern
        self.proj_in = torch.nn.Linear(4, D)
        self.context = torch.nn.Linear(8, D)
        self.register_buffer("freqs", torch.linspace(1.0, 8.0, D // 2))
        self.time = torch.nn.Linear(D, D)
        self.blocks = torch.nn.ModuleList([Block(pattern) for _ in range(n)])
        self.proj_out = torch.nn.Linear(D, 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        args = timestep[:, None] * self.freqs
        temb = self.time(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
        h, e = self.proj_in(hidden_states), self.context(encoder_hidden_states)
        p = self.pattern
        for block in self.blocks:
            if p == 0:
                h, e = block(h, e, temb)
            elif p == 1:
                e, h = block(h, e, temb)
            elif p == 2:
                h = block(h, e, temb)
            elif p == 3:
                h = block(h, temb=temb)
            elif p == 4:
                h, e = block(h, temb=temb)
            else:
                e, h = block(h, temb=temb)
        out = self.proj_out(h)
        if p in (4, 5):
            out = out + e.mean(1, keepdim=True)[..., :4]
        return (out,)


def pattern_case(pattern: int) -> TinyCase:
    torch.manual_seed(pattern)
    return TinyCase(name=f"pattern{pattern}", model=PatternDiT(pattern).eval(), timestep_key="timestep",
                    latent_shape=(S, 4), to_model_time=lambda t: t * 1000,
                    conditioning=lambda b, g: {"encoder_hidden_states": torch.randn((b, T, 8), generator=g)})


@pytest.mark.parametrize("pattern", range(6))
def test_pattern_threshold_zero_matches_eager(pattern):
    case = pattern_case(pattern)
    compiled = compile_case(case, residual_diff_threshold=0.0, max_warmup_steps=1)
    ts = torch.linspace(1.0, 0.1, 5).tolist()
    assert_outputs_close(denoise(compiled, case, ts), denoise(case.model, case, ts), 1e-5)
    assert cachec.summary(compiled).blocks == [f"blocks.{i}" for i in range(4)]


@pytest.mark.parametrize("pattern", range(6))
def test_pattern_cached_steps_follow_the_rule(pattern):
    check_cached_generations(pattern_case(pattern), rising=False)
